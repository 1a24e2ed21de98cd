"""Shared fixtures: tiny random checkpoints written once per test session into a temporary folder."""

import pytest

from checkpoints import TINY_SHAPES, write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint("gqa4") -> folder with a random checkpoint of that shape (written once)."""
    written = {}

    def make(shape_name: str = "gqa4"):
        if shape_name not in written:
            folder = tmp_path_factory.mktemp(f"ckpt-{shape_name}")
            written[shape_name] = write_checkpoint(folder, TINY_SHAPES[shape_name], seed=len(written))
        return written[shape_name]

    return make


@pytest.fixture
def fresh_choosers(monkeypatch):
    """products.py's choosers with no choices yet, so that every candidate kernel runs in its trials."""
    from llama_models.llama3 import products

    monkeypatch.setattr(products, "CPU_CHOOSER", products.KernelChooser(products.CPU_KERNELS))
    monkeypatch.setattr(products, "DEVICE_CHOOSERS", {})
    monkeypatch.setattr(products, "ATTENTION_CHOOSER",
                        products.KernelChooser(products.ATTENTION_KERNELS, kind_of=products.attention_kind))


@pytest.fixture
def one_attention_kernel(monkeypatch):
    """SDPA only: two models compared bit for bit must not depend on which attention candidates the
    global chooser's trials happened to run for each."""
    from llama_models.llama3 import products

    monkeypatch.setattr(products, "ATTENTION_CHOOSER",
                        products.KernelChooser(products.ATTENTION_KERNELS[:1], kind_of=products.attention_kind))
