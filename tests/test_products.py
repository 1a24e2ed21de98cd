"""llama_models/llama3/products.py: every candidate kernel computes x @ W.T, and the chooser keeps the
fastest one per kind of product. Which candidate is fastest depends on the machine, so the choosing
is tested with an injected clock."""

import pytest
import torch
import torch.nn.functional as F

from llama_models.llama3 import load_llama, products

BF16, F32 = torch.bfloat16, torch.float32


@pytest.fixture
def small_row_blocks(monkeypatch):
    """ROW_BLOCK and FLOAT32_BLOCK_BYTES small enough that the tests' matrices are cut into blocks
    (96 rows of 64 inputs: 6 of 16 rows, and in float32 one of 64 rows, the fewest, and a shorter one)."""
    monkeypatch.setattr(products, "ROW_BLOCK", 16)
    monkeypatch.setattr(products, "FLOAT32_BLOCK_BYTES", 40 * 64 * 4)


@pytest.mark.parametrize("rows", [1, 4, 40])  # a decode step, beams, a prompt
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_every_candidate_gives_f_linear_result(small_row_blocks, rows, dtype):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(96, 64, generator=generator).to(dtype)  # (out, in): 6 blocks of 16 rows
    x = torch.randn(rows, 64, generator=generator).to(dtype)  # (rows, in)
    expected = F.linear(x, weight).double()
    scale = expected.abs().max().item()
    tolerance = 1e-5 if dtype == F32 else 2**-7  # bfloat16 results: a step of the last rounding
    candidates = [kernel for kernel in products.CPU_KERNELS if kernel.applies(x, weight)]
    assert len(candidates) >= 3
    for kernel in candidates:
        y = kernel.compute(x, weight)
        assert y.shape == (rows, 96) and y.dtype == dtype, kernel.name
        assert (y.double() - expected).abs().max().item() <= tolerance * scale, kernel.name


@pytest.mark.parametrize("rows", [1, 4, 40])
@pytest.mark.parametrize("scheme", ["int8", "int4 looked up", "int4"])
def test_every_candidate_for_a_quantized_matrix_gives_its_dequantized_product(small_row_blocks, rows, scheme):
    """Its kernel, the matrix dequantized block by block, and for several rows also whole. An int4 matrix
    keeps its codes only where it is looked up too (a tied embedding); else once its kernel has
    packed it, only "float32 blocks" dequantizes it, from that packing, where quantize.py knows its
    layout."""
    from llama_models.llama3.quantize import Int4Weight, Int8Weight

    generator = torch.Generator().manual_seed(7)
    matrix = torch.randn(96, 64, generator=generator).to(BF16)  # (out, in): float32 blocks of 64 and 32 rows
    weight = (Int8Weight.from_float(matrix) if scheme == "int8"
              else Int4Weight.from_float(matrix, looked_up=scheme == "int4 looked up"))
    x = torch.randn(rows, 64, generator=generator).to(BF16)
    expected = F.linear(x.double(), weight.dequantize(F32).double())  # before packing lets go of int4's codes
    candidates = [kernel for kernel in products.CPU_KERNELS if kernel.applies(x, weight)]
    # the kernel, "float32 blocks", and for several rows "dequantized" whole in bfloat16 and in float32
    whole, blocks = weight.can_dequantize, weight.can_dequantize_rows
    assert len(candidates) == 1 + blocks + 2 * (whole and rows > 1)
    for kernel in candidates + candidates:  # int4: from its codes, then from the packing its kernel made
        y = kernel.compute(x, weight)
        assert y.shape == (rows, 96) and y.dtype == BF16, kernel.name
        assert (y.double() - expected).abs().max().item() <= 2**-7 * expected.abs().max().item(), kernel.name


def test_candidates_that_apply_to_each_kind(monkeypatch):
    bf16_matrix, f32_matrix, output_layer = torch.empty(96, 64, dtype=BF16), torch.empty(96, 64), torch.empty(
        4 * products.ROW_BLOCK, 8, dtype=BF16)

    def names(rows, weight):
        x = torch.empty(rows, weight.shape[1], dtype=weight.dtype)
        return {kernel.name for kernel in products.CPU_KERNELS if kernel.applies(x, weight)}

    assert names(1, bf16_matrix) == {"F.linear", "torch.mv", "F.linear, oneDNN off", "torch.mv, oneDNN off",
                                     "float32 blocks"}
    assert names(4, bf16_matrix) == {"F.linear", "weight @ x.T", "F.linear, oneDNN off", "float32 copy",
                                     "float32 blocks"}
    assert names(40, bf16_matrix) == {"F.linear", "weight @ x.T", "F.linear, oneDNN off", "float32 copy",
                                      "float32 blocks"}
    assert names(40, f32_matrix) == {"F.linear", "weight @ x.T"}
    assert "row blocks" in names(1, output_layer)
    monkeypatch.setattr(products, "WHOLE_COPY_BYTES", 96 * 64 * 4 - 1)  # the matrix's float32 copy, less a byte
    assert names(40, bf16_matrix) == {"F.linear", "weight @ x.T", "F.linear, oneDNN off", "float32 blocks"}


def test_every_product_of_a_kind_has_the_same_candidates():
    """The trials of a kind are recorded for the candidates its first product met: every later product
    of the kind (other rows rounding to the same power of two) must meet the same ones."""
    from llama_models.llama3.quantize import Int4Weight, Int8Weight

    matrix = torch.randn(96, 64, dtype=BF16)
    weights = [matrix, matrix.float(), Int8Weight.from_float(matrix), Int4Weight.from_float(matrix),
               Int4Weight.from_float(matrix, looked_up=True)]
    for weight in weights:
        candidates = {}  # kind -> candidate names
        for rows in range(1, 70):
            x = torch.empty(rows, 64, dtype=BF16 if weight is not weights[1] else F32)
            names = {kernel.name for kernel in products.CPU_KERNELS if kernel.applies(x, weight)}
            assert candidates.setdefault(products.product_kind(rows, weight), names) == names, rows


def test_a_new_kind_of_weight_gets_no_dequantizing_candidate_until_it_says_it_can():
    """A QuantizedWeight subclass that implements no `rows` must never meet "dequantized" or "float32
    blocks", which would call it: the safe default is the base class's."""
    from llama_models.llama3.quantize import QuantizedWeight

    class Opaque(QuantizedWeight):
        kind, out_features, in_features = "opaque", 96, 64

        def __init__(self):
            super().__init__()
            self.register_buffer("numbers", torch.empty(96, 64, dtype=BF16))

    x = torch.empty(40, 64, dtype=BF16)  # a prompt: where a matrix that can be is dequantized
    assert [kernel.name for kernel in products.CPU_KERNELS if kernel.applies(x, Opaque())] == []
    chooser = products.KernelChooser(products.CPU_KERNELS)
    with pytest.raises(NotImplementedError, match="no kernel computes products of kind .*'opaque'.*add a Kernel"):
        chooser(x, Opaque())  # says what to add, where a bare min() would fail on an empty list
    assert chooser.times == {}


class FakeClock:
    """A clock that each fake kernel advances by its own cost, so the fastest is known in advance."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def kernel(self, name: str, seconds, calls: list):
        """seconds: a number, or a list giving the time of each successive call."""
        costs = iter(seconds) if isinstance(seconds, list) else None

        def compute(x, weight):
            self.now += next(costs) if costs else seconds
            calls.append(name)
            return F.linear(x, weight)

        return products.Kernel(name, compute)


def test_chooser_tries_each_candidate_then_keeps_the_fastest():
    clock, calls = FakeClock(), []
    kernels = (clock.kernel("slow", 1.8, calls), clock.kernel("fast", 1.0, calls), clock.kernel("middle", 1.4, calls))
    chooser = products.KernelChooser(kernels, trials=2, clock=clock)
    x, weight = torch.ones(1, 8), torch.ones(4, 8)
    for _ in range(10):
        assert torch.equal(chooser(x, weight), F.linear(x, weight))
    assert calls[:6] == ["slow", "fast", "middle"] * 2  # the least tried candidate goes next
    assert calls[6:] == ["fast"] * 4
    times = chooser.times[products.product_kind(1, weight)]
    assert {name: pytest.approx(seconds) for name, seconds in times.items()} == {
        "slow": [1.8, 1.8], "fast": [1.0, 1.0], "middle": [1.4, 1.4]}


def test_chooser_judges_a_candidate_by_its_fastest_trial():
    """A first read of a memory-mapped weight, or another process, makes one trial slow: not the kernel."""
    clock, calls = FakeClock(), []
    kernels = (clock.kernel("a", [9.0, 1.0, 1.0, 1.0], calls), clock.kernel("b", 1.5, calls))
    chooser = products.KernelChooser(kernels, trials=3, clock=clock)
    weight = torch.ones(4, 8)
    for _ in range(7):
        chooser(torch.ones(1, 8), weight)
    assert calls[-1] == "a"


def test_each_kind_of_product_is_chosen_apart():
    """A decode step, beams and a prompt on the same weight, and another weight shape: four choices."""
    clock, calls = FakeClock(), []
    chooser = products.KernelChooser((clock.kernel("only", 1.0, calls),), trials=1, clock=clock)
    square, wide = torch.ones(8, 8), torch.ones(16, 8)
    for rows, weight in [(1, square), (4, square), (3, square), (40, square), (1, wide)]:
        chooser(torch.ones(rows, 8), weight)
    assert len(chooser.chosen) == 4  # 3 and 4 rows are one kind: rounded up to 4
    assert products.product_kind(3, square) == products.product_kind(4, square) != products.product_kind(5, square)


def test_linear_keeps_the_leading_dimensions(fresh_choosers):
    x, weight = torch.randn(2, 5, 64), torch.randn(96, 64)
    for _ in range(products.TRIALS * len(products.CPU_KERNELS)):
        y = products.linear(x, weight)
        assert y.shape == (2, 5, 96)
        torch.testing.assert_close(y, F.linear(x, weight))
    assert products.chosen_kernel(10, weight) in {kernel.name for kernel in products.CPU_KERNELS}
    assert products.chosen_kernel(1, weight) == "(still timing)"


def test_other_devices_use_f_linear(fresh_choosers):
    """The meta device (shapes, no data) stands in for a GPU, which this machine may not have."""
    x, weight = torch.ones(1, 3, 64, dtype=BF16, device="meta"), torch.ones(96, 64, dtype=BF16, device="meta")
    assert products.linear(x, weight).shape == (1, 3, 96)
    assert products.CPU_CHOOSER.times == {}  # no CPU candidate was timed on it
    assert products.DEVICE_CHOOSERS[torch.device("meta")].times == {}  # one candidate: nothing timed
    assert products.chosen_kernel(3, weight) == "F.linear"


def test_a_built_in_kernel_is_used_only_where_it_runs_and_agrees(fresh_probes, monkeypatch):
    """The CPU has torch._weight_int8pack_mm but not torch._weight_int4pack_mm (CUDA's and MPS's); the
    meta device runs neither (no numbers to compare); a kernel giving other numbers is refused."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert products.built_in_kernel_agrees(cpu, "int8", BF16, 0)
    assert products.built_in_kernel_agrees(cpu, "int8", F32, 0)
    assert not products.built_in_kernel_agrees(cpu, "int4", BF16, 32)
    assert not products.built_in_kernel_agrees(meta, "int8", BF16, 0)
    assert not products.built_in_kernel_agrees(meta, "int4", BF16, 32)  # PyTorch's meta kernel fails here
    products.built_in_kernel_agrees.cache_clear()
    monkeypatch.setattr(products, "_int8_kernel", lambda x, weight: 1.1 * F.linear(x, weight.dequantize(x.dtype)))
    assert not products.built_in_kernel_agrees(cpu, "int8", BF16, 0)


@pytest.mark.parametrize("rows", [1, 4, 40])
def test_the_device_candidates_compute_the_dequantized_product(fresh_probes, rows):
    """DEVICE_KERNELS run on CPU tensors here: int8 has its built-in kernel (the CPU has that op) and
    the dequantized product as candidates, both timed; int4, whose kernel the CPU lacks, has one."""
    from llama_models.llama3.quantize import Int4Weight, Int8Weight

    generator = torch.Generator().manual_seed(5)
    matrix = torch.randn(64, 128, generator=generator).to(BF16)
    x = torch.randn(rows, 128, generator=generator).to(BF16)
    chooser = products.KernelChooser(products.DEVICE_KERNELS)
    for weight in (Int8Weight.from_float(matrix), Int4Weight.from_float(matrix)):
        expected = F.linear(x.float(), weight.dequantize(F32))
        for _ in range(2 * products.TRIALS):
            y = chooser(x, weight)
            assert (y.float() - expected).abs().max() <= 2**-7 * expected.abs().max()
    assert set(chooser.times[products.product_kind(rows, Int8Weight.from_float(matrix))]) == {
        "int8 kernel", "dequantized"}
    assert chooser.chosen[products.product_kind(rows, Int4Weight.from_float(matrix))].name == "dequantized"


@pytest.mark.parametrize("rows", [1, 4, 40])
def test_where_int4_has_its_built_in_kernel_it_is_the_only_candidate(fresh_probes, emulated_tinygemm, rows):
    """The CPU standing in for a GPU whose PyTorch has the int4 kernel: the probe passes, the kernel
    serves every kind untimed, a matrix only multiplied lets go of its codes, a looked-up one keeps them."""
    from llama_models.llama3.quantize import Int4Weight

    generator = torch.Generator().manual_seed(6)
    matrix = torch.randn(64, 128, generator=generator).to(BF16)
    x = torch.randn(rows, 128, generator=generator).to(BF16)
    chooser = products.KernelChooser(products.DEVICE_KERNELS)
    for looked_up in (False, True):
        weight = Int4Weight.from_float(matrix, looked_up=looked_up)
        expected = F.linear(x.float(), weight.dequantize(F32))
        for _ in range(2):
            assert (chooser(x, weight).float() - expected).abs().max() <= 2**-7 * expected.abs().max()
        assert (weight.codes is not None) == looked_up
    kind = products.product_kind(rows, weight)
    assert chooser.chosen[kind].name == "int4 kernel" and kind not in chooser.times


def test_a_shape_off_the_built_in_kernels_tiles_is_dequantized(fresh_probes):
    from llama_models.llama3.quantize import Int8Weight

    for width, fits in [(96, False), (128, True)]:  # inputs in multiples of 128
        weight = Int8Weight.from_float(torch.randn(64, width, dtype=BF16))
        assert products._has_built_in_kernel(torch.ones(1, width, dtype=BF16), weight) == fits


def test_one_row_is_never_multiplied_by_a_whole_converted_copy(fresh_choosers):
    """A whole float copy of the output layer would hold gigabytes for one use of each weight; in
    blocks, or for several rows, converting is one more candidate to time."""
    from llama_models.llama3.quantize import Int8Weight

    matrix = torch.randn(96, 64, dtype=BF16)
    for weight in (matrix, Int8Weight.from_float(matrix)):
        for rows in (1, 4):
            for _ in range(products.TRIALS * len(products.CPU_KERNELS)):
                products.linear(torch.randn(rows, 64, dtype=BF16), weight)
        one_row, four_rows = (set(products.CPU_CHOOSER.times[products.product_kind(rows, weight)]) for rows in (1, 4))
        whole_copies = {"float32 copy"} if weight is matrix else {"dequantized", "dequantized to float32"}
        assert "float32 blocks" in one_row and not one_row & whole_copies
        assert whole_copies | {"float32 blocks"} <= four_rows


def test_onednn_off_restores_the_setting():
    before = torch._C._get_mkldnn_enabled()
    with products.onednn_off():
        assert not torch._C._get_mkldnn_enabled()
    assert torch._C._get_mkldnn_enabled() == before


def test_bfloat16_model_stays_close_to_float32_whatever_is_chosen(tiny_checkpoint, fresh_choosers):
    """A 40-token prompt and decode steps through a fresh chooser (so its trials run every candidate):
    the bfloat16 logits stay close to the float32 model's."""
    folder = tiny_checkpoint("gqa4")
    exact, _ = load_llama(folder, dtype=F32, max_seq_len=64)
    tokens = torch.randint(0, exact.args.vocab_size, (1, 44), generator=torch.Generator().manual_seed(5))
    reference = exact(tokens, start_pos=0)  # (1, 44, vocab)
    model, _ = load_llama(folder, dtype=BF16, max_seq_len=64)
    prompt = model(tokens[:, :40], start_pos=0)
    steps = [model(tokens[:, pos : pos + 1], start_pos=pos) for pos in range(40, 44)]
    logits = torch.cat([prompt, *steps], dim=1)
    relative_error = (logits - reference).norm() / reference.norm()
    assert relative_error.item() < 0.05
    for chooser in (products.CPU_CHOOSER, products.ATTENTION_CHOOSER):  # several candidates ran
        assert sum(1 for kind in chooser.times.values() for trials in kind.values() if trials) >= 3


def test_chooser_stops_trying_a_candidate_far_slower_than_the_fastest():
    clock, calls = FakeClock(), []
    kernels = (clock.kernel("fast", 1.0, calls), clock.kernel("far slower", 10.0, calls),
               clock.kernel("a bit slower", 1.5, calls))
    chooser = products.KernelChooser(kernels, trials=3, clock=clock)
    weight = torch.ones(4, 8)
    for _ in range(10):
        chooser(torch.ones(1, 8), weight)
    assert calls.count("far slower") == 2 and calls.count("a bit slower") == 3  # two trials, not three
    assert calls[8:] == ["fast"] * 2


# Attention: the same chooser over the attention candidates.


def reference_attention(q, keys, values, mask):
    """softmax(q k^T / sqrt(head_dim)) v in float64, each key/value head repeated for its query heads."""
    n_rep = q.shape[1] // keys.shape[1]
    keys, values = (t.double().repeat_interleave(n_rep, dim=1) for t in (keys, values))
    scores = q.double() @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5  # (batch, heads, seq, kv_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ values


def attention_inputs(batch, seq, kv_len, dtype, n_heads=6, n_kv_heads=2, head_dim=16):
    generator = torch.Generator().manual_seed(batch * 100 + seq * 10 + kv_len)
    q = torch.randn(batch, n_heads, seq, head_dim, generator=generator).to(dtype)
    keys, values = (torch.randn(batch, n_kv_heads, kv_len, head_dim, generator=generator).to(dtype) for _ in range(2))
    # The model's mask: the new tokens are the last `seq` positions, each sees itself and the past.
    mask = None if seq == 1 else torch.arange(kv_len)[None, :] <= torch.arange(kv_len - seq, kv_len)[:, None]
    return q, keys, values, mask


@pytest.mark.parametrize("batch, seq, kv_len", [(1, 1, 7), (3, 1, 20), (2, 5, 12)])  # decode, beams, a prompt
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_every_attention_candidate_gives_the_reference(batch, seq, kv_len, dtype):
    inputs = attention_inputs(batch, seq, kv_len, dtype)
    expected = reference_attention(*inputs)
    tolerance = 1e-5 if dtype == F32 else 2**-7  # bfloat16 results: a step of the last rounding
    candidates = [kernel for kernel in products.ATTENTION_KERNELS if kernel.applies(*inputs)]
    assert len(candidates) == (2 if dtype == F32 else 3)
    for kernel in candidates:
        out = kernel.compute(*inputs)
        assert out.shape == inputs[0].shape and out.dtype == dtype, kernel.name
        assert (out.double() - expected).abs().max().item() <= tolerance * expected.abs().max().item(), kernel.name


def test_written_out_attention_only_where_its_kinds_scores_fit(monkeypatch):
    """Counted on the kind's counts (2 x 6 heads x 8 x 16 = 1536 scores for 5 new and 12 cached
    tokens), so that every product of a kind has the same candidates."""
    def names(seq, kv_len):
        inputs = attention_inputs(2, seq, kv_len, BF16)
        return {kernel.name for kernel in products.ATTENTION_KERNELS if kernel.applies(*inputs)}

    monkeypatch.setattr(products, "GROUPED_SCORES", 1536)
    assert "grouped products in float32" in names(5, 12)
    assert names(5, 12) == names(8, 16)
    monkeypatch.setattr(products, "GROUPED_SCORES", 1535)
    assert names(5, 12) == names(8, 16) == {"SDPA", "SDPA in float32"}


def test_a_decode_steps_attention_is_chosen_again_as_the_cache_doubles(fresh_choosers):
    kinds = [products.attention_kind(*attention_inputs(1, 1, kv_len, BF16)) for kv_len in (5, 8, 9, 16, 17)]
    assert kinds[0] == kinds[1] != kinds[2] == kinds[3] != kinds[4]
    assert products.attention_kind(*attention_inputs(4, 1, 8, BF16)) != kinds[0]  # beams: another batch
    for _ in range(products.TRIALS * len(products.ATTENTION_KERNELS)):
        out = products.attention(*attention_inputs(1, 1, 7, BF16))
    assert out.shape == (1, 6, 1, 16)
    chosen = products.chosen_attention(torch.device("cpu"), batch=1)
    assert chosen.endswith("(cached <= 8)") and chosen.split(" (")[0] in {k.name for k in products.ATTENTION_KERNELS}
    assert products.chosen_attention(torch.device("cpu"), batch=4) == "(still timing)"


def test_other_devices_use_sdpa(fresh_choosers):
    q, keys, values, _ = (t.to("meta") if t is not None else t for t in attention_inputs(1, 1, 7, BF16))
    assert products.attention(q, keys, values, None).shape == (1, 6, 1, 16)
    assert products.ATTENTION_CHOOSER.times == {}  # no CPU candidate was timed on it
    assert products.chosen_attention(q.device, batch=1) == "SDPA"
