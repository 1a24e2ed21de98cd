"""Shared fixtures: tiny random checkpoints written once per test session into a temporary folder."""

import pytest
import torch
import torch.nn.functional as F

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


@pytest.fixture
def one_linear_kernel(monkeypatch):
    """F.linear and the int8 and int4 kernels only, one for each kind of weight: two models compared
    bit for bit must not depend on which candidates the global chooser's trials ran for each."""
    from llama_models.llama3 import products

    kernels = tuple(kernel for kernel in products.CPU_KERNELS if kernel.name in ("F.linear", "int8 kernel", "int4 kernel"))
    monkeypatch.setattr(products, "CPU_CHOOSER", products.KernelChooser(kernels))


@pytest.fixture
def fresh_probes():
    """products.py's probes of the built-in kernels forgotten, before and after the test."""
    from llama_models.llama3 import products

    products.built_in_kernel_agrees.cache_clear()
    yield
    products.built_in_kernel_agrees.cache_clear()


@pytest.fixture
def emulated_tinygemm(monkeypatch, fresh_probes):
    """CUDA's int4 conversion and product, written here from their documented meaning (PyTorch's
    int4mm.cu): the conversion keeps the bytes it is given (column 2k in the high half of byte k), and
    the product computes x @ ((q - 8) * scale + zero).T from them, in float32."""
    def product(x, high_first, group_size, scales_and_zeros):  # scales_and_zeros (groups, out, 2)
        q = torch.stack((high_first >> 4, high_first & 15), dim=-1).flatten(1).float()  # (out, in)
        scale, zero = (scales_and_zeros[..., i].T.float().repeat_interleave(group_size, dim=1) for i in (0, 1))
        return F.linear(x.float(), (q - 8) * scale + zero).to(x.dtype)

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", lambda high_first, tiles: high_first.clone())
    monkeypatch.setattr(torch, "_weight_int4pack_mm", product)
