"""The CPU product choices of llama_models/llama3/products.py: every path computes x @ W.T, and each
case (device, dtype, number of rows, whether this CPU multiplies bfloat16 fast) takes its path.

Which answer the timing probe gives depends on the machine, so the tests set it both ways."""

import pytest
import torch
import torch.nn.functional as F

from llama_models.llama3 import load_llama, products


@pytest.fixture(params=[True, False], ids=["cpu-with-bfloat16", "cpu-without-bfloat16"])
def fast_bfloat16(request, monkeypatch):
    monkeypatch.setattr(products, "cpu_multiplies_bfloat16_fast", lambda: request.param)
    return request.param


@pytest.mark.parametrize("rows", [1, 4, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_computes_x_times_weight_transposed(fast_bfloat16, rows, dtype):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(96, 64, generator=generator).to(dtype)  # (out, in)
    x = torch.randn(1, rows, 64, generator=generator).to(dtype)  # (batch, seq, in)
    ours = products.linear(x, weight)
    assert ours.shape == (1, rows, 96) and ours.dtype == dtype
    reference = F.linear(x.double(), weight.double())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # bfloat16 rounds the results to 8 bits
    assert (ours.double() - reference).abs().max().item() < tolerance * reference.abs().max().item()


def record_kernels(monkeypatch) -> list:
    """Replace torch.mv, torch.mm and F.linear with wrappers that log (kernel, dtype), then compute."""
    calls, mv, mm, linear = [], torch.mv, torch.mm, F.linear

    def logged_mv(matrix, vector):
        calls.append(("mv", vector.dtype))
        return mv(matrix, vector)

    def logged_mm(weight, x_columns):
        assert weight.shape[1] == x_columns.shape[0]  # the weight on the left: (out, in) @ (in, rows)
        calls.append(("mm", x_columns.dtype))
        return mm(weight, x_columns)

    def logged_linear(x, weight):
        assert x.dtype == weight.dtype
        calls.append(("linear", x.dtype))
        return linear(x, weight)

    monkeypatch.setattr(torch, "mv", logged_mv)
    monkeypatch.setattr(torch, "mm", logged_mm)
    monkeypatch.setattr(F, "linear", logged_linear)
    return calls


BF16, F32 = torch.bfloat16, torch.float32
# (dtype, rows) -> kernel and the dtype it multiplies in, on a CPU (with, without) fast bfloat16.
EXPECTED_KERNELS = {
    (BF16, 1): (("mv", BF16), ("linear", BF16)),  # a decode step
    (BF16, 4): (("mm", BF16), ("linear", BF16)),  # beams: too few rows to pay for a conversion
    (BF16, 40): (("mm", BF16), ("linear", F32)),  # a prompt
    (F32, 1): (("linear", F32), ("linear", F32)),
    (F32, 40): (("linear", F32), ("linear", F32)),
}


@pytest.mark.parametrize("dtype, rows", sorted(EXPECTED_KERNELS, key=str))
def test_kernel_and_dtype_chosen_for_each_case(fast_bfloat16, monkeypatch, dtype, rows):
    calls = record_kernels(monkeypatch)
    products.linear(torch.ones(1, rows, 64, dtype=dtype), torch.ones(96, 64, dtype=dtype))
    with_fast_bfloat16, without = EXPECTED_KERNELS[(dtype, rows)]
    assert calls == [with_fast_bfloat16 if fast_bfloat16 else without]


def test_other_devices_always_use_f_linear_in_their_dtype(monkeypatch):
    """The meta device (shapes, no data) stands in for a GPU, which this machine may not have."""
    monkeypatch.setattr(products, "cpu_multiplies_bfloat16_fast", lambda: False)
    calls = record_kernels(monkeypatch)
    for rows in (1, 40):
        products.linear(torch.ones(1, rows, 64, dtype=BF16, device="meta"), torch.ones(96, 64, dtype=BF16, device="meta"))
    assert calls == [("linear", BF16), ("linear", BF16)]


def test_both_kinds_of_cpu_give_the_float32_model_logits(tiny_checkpoint, monkeypatch):
    """A 40-token prompt (float32 products on a CPU without fast bfloat16) and decode steps: the
    bfloat16 logits stay close to the float32 model's on both kinds of CPU."""
    folder = tiny_checkpoint("gqa4")
    exact, _ = load_llama(folder, dtype=torch.float32, max_seq_len=64)
    tokens = torch.randint(0, exact.args.vocab_size, (1, 44), generator=torch.Generator().manual_seed(5))
    reference = exact(tokens, start_pos=0)  # (1, 44, vocab)
    for fast in (True, False):
        monkeypatch.setattr(products, "cpu_multiplies_bfloat16_fast", lambda fast=fast: fast)
        model, _ = load_llama(folder, dtype=torch.bfloat16, max_seq_len=64)
        prompt = model(tokens[:, :40], start_pos=0)
        steps = [model(tokens[:, pos : pos + 1], start_pos=pos) for pos in range(40, 44)]
        logits = torch.cat([prompt, *steps], dim=1)
        relative_error = (logits - reference).norm() / reference.norm()
        assert relative_error.item() < 0.05, f"fast bfloat16 = {fast}"


def test_timing_probe_leaves_the_random_state_alone():
    """Sampling with a seed must give the same text whether or not the probe ran in between."""
    state = torch.get_rng_state()
    assert isinstance(products.cpu_multiplies_bfloat16_fast.__wrapped__(), bool)
    assert torch.equal(torch.get_rng_state(), state)
