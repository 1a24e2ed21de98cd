"""The model on each accelerator this machine has (CUDA, Apple's MPS), against references on the CPU.

The other tests check our arithmetic on the CPU. These check what only an accelerator runs: its own
matrix products and scaled_dot_product_attention (products.py leaves both to the device), the
default dtype there, quantized weights (by PyTorch's built-in kernels where they serve, else
dequantized for each product), and the script's device paths (synchronizing before each timing,
the device's peak memory). Where the machine has no accelerator, pytest lists these tests as
skipped, with the empty parameter list as the reason.
"""

import re

import pytest
import torch

from hf_reference import hf_model_from_meta_checkpoint
from llama_models.llama3 import load_llama, products
from llama_models.llama3.quantize import QuantizedWeight
from test_model_parity import random_tokens
from test_quantize import dequantized_copy
from test_run_inference import assert_ran_cleanly, run_python, with_settings

ACCELERATORS = [name for name, present in [("cuda", torch.cuda.is_available()),
                                           ("mps", torch.backends.mps.is_available())] if present]
on_each_accelerator = pytest.mark.parametrize("device", ACCELERATORS)

# float32 on both sides. A GPU adds in other orders than the CPU, in more partial sums; a wrong
# head, position or scale moves the tiny models' logits by 0.1 or more.
TOLERANCE = 1e-3


@on_each_accelerator
def test_float32_forward_matches_transformers_on_the_cpu(tiny_checkpoint, device):
    folder = tiny_checkpoint("gqa4")
    model, _ = load_llama(folder, device=device, dtype=torch.float32, max_seq_len=64, max_batch_size=2)
    reference = hf_model_from_meta_checkpoint(folder, rope_scale_factor=model.args.rope_scale_factor)
    tokens = random_tokens(2, 40, model.args.vocab_size)

    ours = model(tokens.to(device), start_pos=0)
    with torch.no_grad():
        theirs = reference(tokens).logits

    assert ours.device.type == device
    assert (ours.cpu() - theirs).abs().max().item() < TOLERANCE
    assert theirs.std().item() > 0.1


@on_each_accelerator
def test_cached_decoding_matches_the_full_forward(tiny_checkpoint, device):
    """A 5-token prefill (a mask), then one token per call (no mask, SDPA over the whole cache)."""
    model, _ = load_llama(tiny_checkpoint("gqa3"), device=device, dtype=torch.float32, max_seq_len=64,
                          max_batch_size=2)
    tokens = random_tokens(2, 20, model.args.vocab_size, seed=1).to(device)
    full = model(tokens, start_pos=0)
    steps = [model(tokens[:, :5], start_pos=0)] + [model(tokens[:, pos : pos + 1], start_pos=pos)
                                                  for pos in range(5, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < TOLERANCE


@on_each_accelerator
def test_the_default_dtype_stays_close_to_float32(tiny_checkpoint, device):
    """dtype=None: bfloat16 where the device has it, else float16; both round activations."""
    folder = tiny_checkpoint("gqa4")
    exact, _ = load_llama(folder, dtype=torch.float32, max_seq_len=32)
    fast, _ = load_llama(folder, device=device, max_seq_len=32)
    tokens = random_tokens(1, 16, exact.args.vocab_size, seed=3)
    reference = exact(tokens, start_pos=0)
    assert fast.tok_embeddings.weight.dtype in (torch.bfloat16, torch.float16)
    relative_error = (fast(tokens.to(device), start_pos=0).cpu() - reference).norm() / reference.norm()
    assert relative_error.item() < 0.05


@on_each_accelerator
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weights_compute_the_dequantized_model(tiny_checkpoint, device, scheme):
    """Quantized at load on the device; the reference is the float model on the CPU, its matrices
    replaced by the same quantized numbers. A prefill, decode steps and a batch of 3 (beams)."""
    folder = tiny_checkpoint("gqa4")
    model, _ = load_llama(folder, device=device, dtype=torch.float32, max_seq_len=64, max_batch_size=3,
                          quantize=scheme)
    reference = dequantized_copy(folder, scheme, torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (3, 42), generator=torch.Generator().manual_seed(2))
    for start, stop, batch in [(0, 40, 1), (40, 41, 1), (0, 40, 3), (40, 42, 3)]:
        expected = reference(tokens[:batch, start:stop], start)
        ours = model(tokens[:batch, start:stop].to(device), start).cpu()
        assert (ours - expected).abs().max().item() < TOLERANCE * expected.abs().max().item()


# Built-in kernels that PyTorch's source says a device of that type has, which products.py must
# then use (others may exist: MPS's int4, CUDA's int8): tinygemm needs compute capability 8.0 or later.
BUILT_IN_KERNELS = {("cuda", "int4"): torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0),
                    ("mps", "int8"): True}



@on_each_accelerator
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_built_in_kernels_compute_the_dequantized_model_in_bfloat16(tiny_checkpoint, fresh_choosers, device,
                                                                    scheme):
    """bfloat16, which tinygemm takes; gqa4's matrices fit the kernels' tiles. The reference is the
    float model on the same device, its matrices the same quantized numbers dequantized. Both differ
    by the rounding of bfloat16 activations, a percent of the largest logit at most."""
    folder = tiny_checkpoint("gqa4")
    model, _ = load_llama(folder, device=device, dtype=torch.bfloat16, max_seq_len=64, max_batch_size=3,
                          quantize=scheme)
    reference = dequantized_copy(folder, scheme, torch.bfloat16).to(device)
    wq = model.layers[0].attention.wq.weight
    if BUILT_IN_KERNELS.get((device, scheme)):  # gqa4's matrices all fit the kernels' tiles
        assert all(products.built_in_kernel_serves(weight, torch.bfloat16)
                   for weight in model.modules() if isinstance(weight, QuantizedWeight))
    tokens = torch.randint(0, model.args.vocab_size, (3, 48), generator=torch.Generator().manual_seed(2))
    for start, stop, batch in [(0, 40, 1), *[(pos, pos + 1, 1) for pos in range(40, 48)], (0, 40, 3), (40, 48, 3)]:
        expected = reference(tokens[:batch, start:stop].to(device), start).float()
        ours = model(tokens[:batch, start:stop].to(device), start).float()
        assert (ours - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    if BUILT_IN_KERNELS.get((device, scheme)):  # int4's only candidate there; int8's timed against dequantizing
        tried = products.chooser_for(wq.device).times.get(products.product_kind(1, wq), {})
        assert products.chosen_kernel(1, wq) == f"{scheme} kernel" or f"{scheme} kernel" in tried
    print(f"{device} {scheme}: one row by {products.chosen_kernel(1, wq)}, 40 rows by {products.chosen_kernel(40, wq)}")


@on_each_accelerator
def test_the_script_decodes_and_profiles_on_the_device(tiny_checkpoint, device):
    settings = (f"r.DEVICE = {device!r}\nr.MAX_NEW_TOKENS = 8\nr.SHOW_PROFILE = True\nr.SHOW_MEMORY = True\n"
                "r.main()\nr.DECODING = 'beam'\nr.SHOW_PROFILE = False\nr.SHOW_MEMORY = False\n"
                "r.main()\nr.DECODING = 'greedy'\nr.DTYPE = 'bfloat16'\nr.QUANTIZE = 'int4'")
    finished = run_python(with_settings(settings), checkpoint=tiny_checkpoint("gqa4"))
    assert_ran_cleanly(finished)
    assert f"on {device}" in finished.stdout
    assert re.search(r"^  attention .* SDPA", finished.stdout, re.MULTILINE)
    assert re.search(r"^--- beam 4:", finished.stdout, re.MULTILINE)
    indexed = torch.ones(0, device=device).device  # "cuda:0", as the model's tensors name it
    served = products.built_in_kernel_agrees(indexed, "int4", torch.bfloat16, 32)
    assert f"the int4 matrices are {'multiplied by' if served else 'dequantized'}" in finished.stdout
