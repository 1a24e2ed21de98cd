"""llama_models/llama3/quantize.py: int8 and int4 weights.

The quantized model must compute what our float model computes on the dequantized weights (up to the
kernels' rounding): that checks the kernels, the layouts and the dispatch. How far quantization
moves the logits from the bfloat16 model is measured and bounded separately.
"""

import time

import pytest
import torch

from llama_models.llama3 import LlamaError, load_llama, products
from llama_models.llama3.quantize import (GROUP_SIZE, Float16Weight, Int4Weight, Int8Weight, fbgemm_available, quantize,
                                         unpack_codes)

SCHEMES = ["int8", "int4", pytest.param("fp16", marks=pytest.mark.skipif(
    not fbgemm_available(), reason="fp16 packs for fbgemm, which only x86 builds of PyTorch have"))]
KINDS = {"int8": Int8Weight, "int4": Int4Weight, "fp16": Float16Weight}


def dequantized_copy(folder, scheme: str, dtype):
    """Our float model with each matrix replaced by its quantized form, dequantized: the numbers the
    quantized model multiplies by (the same from_float, which is deterministic, as quantize uses)."""
    model, _ = load_llama(folder, dtype=dtype, max_seq_len=64, max_batch_size=3)
    for module in {id(m): m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                   and m.weight.dim() == 2}.values():
        if scheme == "fp16" and hasattr(module, "num_embeddings"):
            continue  # fp16 packs only what is multiplied; the embedding stays as it was
        module.weight.data = KINDS[scheme].from_float(module.weight.data).dequantize(dtype)
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", ["gqa4", "gqa3"])  # tied output (Llama 3.2) and a separate one
def test_quantized_model_computes_the_float_model_on_dequantized_weights(tiny_checkpoint, fresh_choosers,
                                                                         shape, scheme):
    """Float32, so that only the order of additions differs: a 40-token prefill (every prompt
    candidate takes turns), decode steps and a batch of 3 rows (beams)."""
    folder = tiny_checkpoint(shape)
    model, _ = load_llama(folder, dtype=torch.float32, max_seq_len=64, max_batch_size=3, quantize=scheme)
    reference = dequantized_copy(folder, scheme, torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (3, 48), generator=torch.Generator().manual_seed(2))
    for candidate in (model, reference):
        assert candidate(tokens[:1, :40], start_pos=0).shape[1] == 40  # warm: trials run on the first calls
    for start, stop, batch in [(0, 40, 1), (40, 41, 1), (41, 42, 1), (0, 40, 3), (40, 41, 3), (41, 48, 3)]:
        ours, expected = model(tokens[:batch, start:stop], start), reference(tokens[:batch, start:stop], start)
        assert (ours - expected).abs().max().item() < 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("scheme, bound", [("int8", 0.05), ("int4", 0.5)])
def test_quantization_error_against_bfloat16_is_bounded(tiny_checkpoint, scheme, bound):
    """Relative distance of the logits from the bfloat16 model's. Measured on the tests' random
    gqa4 model: int8 about 0.04, int4 about 0.3 (random weights fill their range evenly, the worst
    case for 16 levels; trained weights lose less)."""
    folder = tiny_checkpoint("gqa4")
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    exact, _ = load_llama(folder, dtype=torch.bfloat16, max_seq_len=64)
    quantized, _ = load_llama(folder, dtype=torch.bfloat16, max_seq_len=64, quantize=scheme)
    reference = exact(tokens, start_pos=0)
    error = ((quantized(tokens, start_pos=0) - reference).norm() / reference.norm()).item()
    assert error < bound
    if scheme == "int4":  # 16 levels are coarser than 255: a real difference, or the test proves nothing
        int8, _ = load_llama(folder, dtype=torch.bfloat16, max_seq_len=64, quantize="int8")
        assert ((int8(tokens, start_pos=0) - reference).norm() / reference.norm()).item() < error


def test_bfloat16_round_trip_stays_near_half_a_step():
    """The scales are stored in bfloat16 too; the codes are made for the stored scale."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    step = weight.float().abs().amax(dim=1, keepdim=True) / 127
    error = (Int8Weight.from_float(weight).dequantize(torch.float32) - weight.float()).abs()
    assert (error <= 0.55 * step).all() and (error <= step / 2 + 1e-6).float().mean() > 0.99


def test_round_trip_of_each_weight_is_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    int8 = Int8Weight.from_float(weight)
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((int8.dequantize(torch.float32) - weight).abs() <= step / 2 + 1e-6).all()
    int4 = Int4Weight.from_float(weight)
    groups = weight.unflatten(1, (-1, GROUP_SIZE))
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    error = (int4.dequantize(torch.float32).unflatten(1, (-1, GROUP_SIZE)) - groups).abs()
    assert (error <= step / 2 + 1e-6).all()
    # Half a byte per int4 weight, plus a scale and a zero per group: first as the portable codes,
    # then as the CPU kernel's packing of them, which a matrix that is only multiplied keeps alone.
    scales_and_zeros = (128 // GROUP_SIZE) * 64 * 2 * 4
    assert int8.nbytes == 64 * 128 + 64 * 4 and int4.nbytes == 64 * 64 + scales_and_zeros
    int4.cpu_packed()
    assert int4.codes is None and int4.nbytes == 64 * 64 + scales_and_zeros


def test_a_tied_embedding_and_output_stay_one_matrix(tiny_checkpoint):
    model, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, quantize="int8")
    assert model.output.weight is model.tok_embeddings.weight
    assert isinstance(model.output.weight, Int8Weight)
    assert not any(isinstance(parameter, torch.Tensor) and parameter.dim() == 2 for parameter in model.parameters())


def test_quantized_weights_follow_the_model_to_another_device(tiny_checkpoint):
    """The meta device (shapes, no data) stands in for a GPU: off the CPU a weight is dequantized."""
    model, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, quantize="int8")
    model.to("meta")
    assert model.output.weight.device.type == "meta"
    logits = model(torch.tensor([[1, 2, 3]], device="meta"), start_pos=0)
    assert logits.shape == (1, 3, model.args.vocab_size)


def test_int4_keeps_only_the_layouts_its_users_need(tiny_checkpoint):
    """On the CPU: the kernel's packing for products, the portable codes for lookups, both if tied."""
    untied, _ = load_llama(tiny_checkpoint("gqa3"), max_seq_len=16, quantize="int4")
    assert untied.output.weight.codes is None and untied.output.weight.packed is not None
    assert untied.tok_embeddings.weight.codes is not None and untied.tok_embeddings.weight.packed is None
    tied, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, quantize="int4")
    assert tied.output.weight.codes is not None and tied.output.weight.packed is not None


@pytest.mark.parametrize("rows", [64, 48, 8192 + 64])
def test_an_int4_matrix_packed_for_the_cpu_dequantizes_from_its_packing(rows):
    """Where cpu_int4_layout knows the kernel's layout, the packing alone gives the weights back,
    so a prompt may still dequantize it block by block; where rows are not a whole number of the
    kernel's blocks, it cannot."""
    from llama_models.llama3.quantize import cpu_int4_layout

    weight = Int4Weight.from_float(torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)))
    before = weight.dequantize(torch.float32)
    weight.cpu_packed()
    assert weight.codes is None
    if cpu_int4_layout() is None or rows % cpu_int4_layout()[0]:
        assert not weight.can_dequantize_rows
        with pytest.raises(LlamaError, match="load the model on the device it runs on"):
            weight.dequantize(torch.float32)
    else:
        assert weight.can_dequantize_rows and torch.equal(weight.dequantize(torch.float32), before)
        out = torch.empty(64, 128)
        weight.float32_rows(rows - 64, out)
        assert torch.equal(out, before[rows - 64 :])


@pytest.mark.parametrize("options, culprit", [
    (dict(quantize="int3"), "unknown quantization 'int3'"),
    (dict(quantize="fp8"), "use None, 'int8', 'int4' or 'fp16'"),
])
def test_an_unknown_scheme_is_one_line(tiny_checkpoint, options, culprit):
    with pytest.raises(LlamaError, match=culprit):
        load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, **options)


@pytest.mark.parametrize("shape, group_size, culprit", [
    ("gqa3", 64, "int4 group size 64 does not divide the input width 96"),
    ("gqa4", 48, "int4 group size 48 is not one of 32, 64, 128, 256"),
    ("gqa4", 16, "int4 group size 16 is not one of"),
])
def test_a_group_size_the_kernel_cannot_take_is_one_line(tiny_checkpoint, shape, group_size, culprit):
    model, _ = load_llama(tiny_checkpoint(shape), max_seq_len=16)
    with pytest.raises(LlamaError, match=culprit):
        quantize(model, "int4", group_size=group_size)
    assert isinstance(model.output.weight, torch.Tensor)  # nothing was changed


def test_an_already_quantized_model_is_refused(tiny_checkpoint):
    model, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, quantize="int8")
    with pytest.raises(LlamaError, match="already quantized"):
        quantize(model, "int4")


@pytest.mark.parametrize("rows, width", [(64, 64), (96, 128), (8192 + 64, 256)])
def test_int4_packing_for_the_cpu_equals_the_kernels_own_conversion(rows, width):
    """Our byte reshuffle (where cpu_int4_layout recognised the kernel's layout) or the kernel's
    conversion (elsewhere, and for rows that are not a whole number of its blocks): the same bytes.
    8192 + 64 rows are packed in two row blocks."""
    weight = Int4Weight.from_float(torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)))
    expected = torch._convert_weight_to_int4pack_for_cpu(unpack_codes(weight.codes, torch.int32), 2)
    assert torch.equal(weight.cpu_packed().flatten(), expected.flatten())


def test_int4_packing_for_cuda_and_mps_gives_the_conversion_high_halves_first(monkeypatch):
    """torch._convert_weight_to_int4pack (CUDA, MPS; not in a CPU build, so caught here) reads
    column 2k from the high half of byte k: PyTorch's int4mm.cu, matrix_to_m16n8k16_Bint4_layout."""
    given = []
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack",
                        lambda codes, tiles: given.append((codes, tiles)) or codes)
    weight = Int4Weight.from_float(torch.randn(32, 128, generator=torch.Generator().manual_seed(0)))
    columns = unpack_codes(weight.codes)  # (32, 128): codes 0..15, column by column
    weight.device_packed()
    (codes, tiles), = given
    assert tiles == 8 and codes.shape == (32, 64) and codes.dtype == torch.uint8
    assert torch.equal(codes >> 4, columns[:, 0::2]) and torch.equal(codes & 15, columns[:, 1::2])
    assert weight.codes is None  # only multiplied: the packing alone is kept


def test_an_int4_packing_does_not_move_to_another_device(tiny_checkpoint):
    """A kernel's layout is its device's: a tied matrix keeps its codes, so its packing is dropped
    (and made again there); a matrix that kept only the CPU's packing cannot move."""
    tied, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, quantize="int4")
    output = tied.output.weight
    output.to("meta")
    assert output.packed is None and output.codes.device.type == "meta"
    with pytest.raises(LlamaError, match="kept only the cpu kernel.s packing.* load the model on the device it runs on"):
        tied.to("meta")


def test_without_a_recognised_layout_the_kernel_packs(monkeypatch):
    from llama_models.llama3 import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "cpu_int4_layout", lambda: None)
    weight = Int4Weight.from_float(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 64)
    expected = x @ weight.dequantize(torch.float32).T  # before the product: packing lets go of the codes
    assert torch.allclose(products.linear(x, weight), expected, atol=1e-4) and weight.codes is None


@pytest.mark.skipif(not fbgemm_available(), reason="fp16 packs for fbgemm, which only x86 builds of PyTorch have")
def test_fp16_holds_the_bfloat16_weights_exactly_and_packs_only_the_products(tiny_checkpoint):
    """Unpacked, a weight in float16's normal range (from 2^-14, about 6.1e-5) comes back bit for bit,
    a smaller one within half of float16's smallest step, 2^-25; the embedding (tied to the output
    layer in gqa4) stays the bfloat16 tensor."""
    bfloat16, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16)
    packed, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, quantize="fp16")
    assert isinstance(packed.output.weight, Float16Weight)
    assert isinstance(packed.tok_embeddings.weight, torch.Tensor)
    for original, fp16 in [(bfloat16.output.weight, packed.output.weight),
                           (bfloat16.layers[0].attention.wq.weight, packed.layers[0].attention.wq.weight)]:
        original, unpacked = original.float(), fp16.dequantize(torch.float32)
        normal = original.abs() >= 2**-14
        assert torch.equal(unpacked[normal], original[normal])
        assert ((unpacked - original)[~normal].abs() <= 2**-25).all()
    wq = packed.layers[0].attention.wq.weight
    assert wq.nbytes == 2 * wq.shape[0] * wq.shape[1]
    with pytest.raises(LlamaError, match="cannot move to meta"):
        packed.to("meta")
    widened, _ = load_llama(tiny_checkpoint("gqa4"), max_seq_len=16, quantize="fp16")
    widened.float()  # the activations follow the model's dtype, and so do the products' results
    assert widened.layers[0].attention.wq.weight.scales_dtype == torch.float32
    assert torch.isfinite(widened(torch.tensor([[1, 2, 3]]), start_pos=0)).all()


def test_matrices_quantized_in_several_threads_come_out_in_place():
    """fp16 packs one matrix per thread, at most that many ahead: each result must reach its own
    module, in order, whatever finishes first."""
    from llama_models.llama3.quantize import in_order_with_lookahead

    started = []

    def slow_for_the_first(item):
        started.append(item)
        if item == 0:
            time.sleep(0.05)  # the later items finish first
        return item * 10

    results = []
    for result in in_order_with_lookahead(slow_for_the_first, list(range(7)), workers=3):
        results.append(result)
        assert len(started) <= len(results) + 2  # 3 at most in flight: the one just handed over and 2 more
    assert results == [0, 10, 20, 30, 40, 50, 60]
    assert list(in_order_with_lookahead(slow_for_the_first, [], workers=3)) == []
