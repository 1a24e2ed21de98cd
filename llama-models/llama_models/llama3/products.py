"""Matrix products and attention: which PyTorch kernel computes each, chosen by timing the candidates here.

Every linear layer of the model calls `linear(x, weight)`. PyTorch has several kernels that compute
that product, and which one is fastest depends on the CPU, its instruction set, the libraries in the
PyTorch build and the shape (README, "Speed and memory, measured", has two machines' figures). So
nothing here says which kernel to use: on the CPU the first products of each kind are computed by
the candidates in turn, each timed where it runs (the weights streaming from memory between the
other layers' products, exactly as they will in every later step), and from then on each kind uses
the one that was fastest. Other devices choose the same way among their own candidates (below).

A kind of product is (dtype, weight shape, rows rounded up to a power of two; a quantized matrix's
"dtype" holds more: `product_kind`). Rows tell apart the products that set a Llama's speed:

- one row: a decode step. Every weight is read once for one token, so the time is the time to
  stream the weight from memory, and the best kernel is the one that streams fastest;
- a few rows: a beam-search step, one row per beam. Still one read of the weights, now shared;
- many rows: a prompt, where each weight is used once per row and arithmetic takes the time.

The candidates (`CPU_KERNELS`), each computing (rows, in) x (out, in) -> (rows, out):

- "F.linear": PyTorch's usual product, rows times the transposed weight.
- "torch.mv" (one row) and "weight @ x.T" (several): the weight on the left, (out, in) times
  columns. Libraries that pack the left operand (oneDNN for bfloat16) stream it differently.
- "F.linear, oneDNN off" and "torch.mv, oneDNN off" (bfloat16): the same calls with oneDNN, Intel's
  kernel library inside PyTorch, switched off, so that PyTorch's own bfloat16 kernels run.
- "float32 copy" (bfloat16, several rows, matrices of up to WHOLE_COPY_BYTES in float32): convert
  this one matrix to float32 for the duration of the product, then multiply in float32. It pays
  where the CPU has no bfloat16 arithmetic and converts every element on the fly for every row; it
  is never a second resident copy.
- "float32 blocks" (bfloat16, and quantized matrices that can be dequantized; any rows): the same
  in blocks of FLOAT32_BLOCK_BYTES, each block of weight rows converted (or dequantized) into a
  float32 scratch and multiplied weight-first, so that a block is multiplied while it is still in
  the CPU's cache. The scratch is small enough that the memory allocator hands the same memory
  back at every product (glibc keeps blocks under its mmap threshold, at most 32 MiB, in its heap),
  where a whole float32 copy is fresh pages for the operating system to zero and map each time.
- "row blocks" (matrices of at least 4 x ROW_BLOCK rows, the output layer): the product in blocks
  of ROW_BLOCK weight rows, each written into its slice of the result, for kernels that slow down
  on one very large operand.
- Quantized weights (quantize.py): "int8 kernel" (torch._weight_int8pack_mm) and "int4 kernel"
  (torch._weight_int4pack_mm_for_cpu), which convert the small numbers as they multiply, and where
  "float32 copy" applies, "dequantized" and "dequantized to float32" (int8, and an int4 matrix that
  keeps its codes, which on the CPU only a tied embedding does): the matrix converted back once for
  the product, which pays where the kernel would repeat the conversion for every row. "float32 blocks"
  also takes an int4 matrix that kept only the kernel's packing, where quantize.py knows its
  layout. A matrix packed for fbgemm (quantize.py's "fp16") has "fbgemm fp16": float32 rows times
  its float16 weights.

Rounding: every candidate multiplies the stored numbers exactly and adds in float32; a bfloat16
result is rounded to bfloat16 once at the end. (A quantized weight dequantized to bfloat16 is the
one exception: each weight is rounded to bfloat16 before the product, a relative 2^-9.) What
differs is the order of the additions (each kernel blocks the sum over `in` its own way), which
moves a float32 sum by a few units in its last place, and can flip the final bfloat16 rounding of
a result by one step. "row blocks" computes each
output element with the same kernel over the same whole row as the unblocked product. So a model
gives the same logits with any choice up to that rounding; two runs whose timings chose differently
may differ in the last bits.

The rule: each candidate that applies to a kind computes TRIALS products of that kind (on different
layers' weights of the same shape, or on the same one in later steps), and the kind's kernel is
the candidate with the lowest single time (a kind with one candidate is not timed at all):
interference from other processes, or a weight's first read from a memory-mapped file, only ever
adds time. A candidate whose best of two times is more than DROP_FACTOR times the fastest seen
stops early: where bfloat16 products are slow, a prompt's bfloat16 candidates take several times
longer than the float32 copy, and two trials show it. The trials are the model's own products,
so choosing costs no extra work, only the difference between the slower candidates and the
fastest during those first products: part of the first prompt, and the first decode steps (the
output layer runs once a step, so its kind takes the most: TRIALS steps per candidate that
applies, fewer where slow ones stop early).
`chosen_kernel(rows, weight)` names what was chosen; run_inference.py's SHOW_PROFILE shows it
beside the time each part of a decode step takes.

Off the CPU (CUDA, MPS: `DEVICE_KERNELS`) a float matrix is multiplied by F.linear, the device's
own library, and a quantized one by PyTorch's built-in kernel for it where this PyTorch has one
for the device and the activations' dtype: "int8 kernel" (torch._weight_int8pack_mm: MPS, and a
simple one in CUDA builds) and "int4 kernel" (torch._weight_int4pack_mm: CUDA's tinygemm, on GPUs
of compute capability 8.0 or later with bfloat16 activations, and MPS). Which exist is not
assumed: each is tried once per device, dtype and group size on a small probe matrix, and used
only if it gives the dequantized product (`built_in_kernel_agrees`). Where it does not, or for
int8 as a second candidate, "dequantized" converts the matrix back for each product. The timing
there waits for the device to finish each product.

A new kind of weight (quantized, packed) plugs in as more candidates: a Kernel in CPU_KERNELS (or
DEVICE_KERNELS) whose `applies` accepts its weights, so that the same trials pick among them.
Attention, the model's other product, is chosen by the same mechanism among its own candidates
(the last section below).
"""

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .devices import synchronize
from .quantize import INNER_K_TILES, quantized

# "row blocks": weight rows per block. A block of the Llama 3 output layer (128,256 x dim) is 1/8 of it.
ROW_BLOCK = 16384
# "float32 blocks": one block's float32 scratch, no larger than a CPU's last-level cache (several
# MiB), so that a block converted is still there when it is multiplied.
FLOAT32_BLOCK_BYTES = 4 * 2**20
# "float32 copy", "dequantized": the largest whole float32 copy of a matrix (an 8B feed-forward
# matrix's is 224 MiB), memory that a run's peak includes while it lasts.
WHOLE_COPY_BYTES = 256 * 2**20
TRIALS = 3  # timed products per candidate and kind
DROP_FACTOR = 2  # a candidate this many times slower than the fastest trial so far is tried no more


@dataclass(frozen=True)
class Kernel:
    """One way to compute a product: x @ weight.T (x (rows, in), weight (out, in) -> (rows, out)), or
    attention (q, keys, values, mask -> out). `applies` takes the same inputs and says if it can."""

    name: str
    compute: Callable[..., torch.Tensor]
    applies: Callable[..., bool] = lambda *inputs: True


@contextlib.contextmanager
def onednn_off():
    # torch.backends.mkldnn.flags(enabled=False) does the same but also resets the TF32 setting,
    # which prints a warning on every CPU build; this switches the one flag.
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _f_linear(x, weight):
    return F.linear(x, weight)


def _matrix_vector(x, weight):  # x: (1, in)
    return torch.mv(weight, x[0])[None]  # (out,) -> (1, out)


def _weight_first(x, weight):
    return torch.mm(weight, x.T).T.contiguous()  # (out, in) @ (in, rows) = (out, rows) -> (rows, out)


def _without_onednn(product):
    def compute(x, weight):
        with onednn_off():
            return product(x, weight)

    return compute


def _float32_copy(x, weight):
    # .float() of one matrix, freed when the product returns: never a second resident copy.
    return F.linear(x.float(), weight.float()).to(x.dtype)


def _float32_blocks(x, weight):
    n = weight.shape[0]
    # Weight rows per block, a multiple of 64: no block splits the CPU int4 kernel's groups of rows.
    block = max(64, FLOAT32_BLOCK_BYTES // (4 * weight.shape[1]) // 64 * 64)
    scratch = x.new_empty(min(block, n), weight.shape[1], dtype=torch.float32)  # (block, in)
    part = x.new_empty(min(block, n), x.shape[0], dtype=torch.float32)  # (block, rows)
    columns = x.float().T  # (in, rows): a transposed view, which the float32 product takes as it is
    y = x.new_empty(x.shape[0], n)  # (rows, out)
    for start in range(0, n, block):
        size = min(block, n - start)  # the last block may be shorter
        if isinstance(weight, torch.Tensor):
            scratch[:size].copy_(weight[start : start + size])
        else:
            weight.float32_rows(start, scratch[:size])
        torch.mm(scratch[:size], columns, out=part[:size])
        y[:, start : start + size].copy_(part[:size].T)  # rounded once, to x's dtype
    return y


def _row_blocks(x, weight):
    out = x.new_empty(x.shape[0], weight.shape[0])  # (rows, out)
    for start in range(0, weight.shape[0], ROW_BLOCK):
        block = weight[start : start + ROW_BLOCK]  # (ROW_BLOCK, in), a view
        torch.mm(x, block.T, out=out[:, start : start + ROW_BLOCK])
    return out


def _int8_kernel(x, weight):  # x (rows, in) in any float dtype; scales in x's dtype
    # .contiguous(): free where x is, and CUDA's kernel reads x as if it were without checking
    return torch._weight_int8pack_mm(x.contiguous(), weight.values, weight.scales.to(x.dtype))


def _int4_kernel(x, weight):
    packed = weight.cpu_packed()  # made on the first product unless loading made it (quantize.pack_for_cpu)
    return torch._weight_int4pack_mm_for_cpu(x, packed, weight.group_size, weight.scales_and_zeros.to(x.dtype))


def _built_in_int4_kernel(x, weight):  # off the CPU: CUDA's tinygemm, MPS
    packed = weight.device_packed()  # made on the first product
    scales_and_zeros = weight.scales_and_zeros.to(x.dtype)
    return torch._weight_int4pack_mm(x.contiguous(), packed, weight.group_size, scales_and_zeros)


def _fbgemm_float16(x, weight):
    return weight.product(x)


def _dequantized(x, weight):
    # One matrix back in x's dtype for the duration of the product: never a second resident copy.
    return F.linear(x, weight.dequantize(x.dtype))


def _dequantized_float32(x, weight):
    return F.linear(x.float(), weight.dequantize(torch.float32)).to(x.dtype)


# Which weights and row counts each candidate takes: (x, weight) -> bool, x (rows, in).


def _is_plain(x, weight):
    return isinstance(weight, torch.Tensor)


def _is_bfloat16(x, weight):
    return weight.dtype == torch.bfloat16


def _is_int8(x, weight):
    return weight.dtype == "int8"


def _is_int4(x, weight):
    return weight.dtype == "int4"


def _is_float16(x, weight):
    return weight.dtype == "fp16"


def _may_copy_whole(x, weight):
    # A whole converted copy of the matrix uses each weight more than once only for several rows (a
    # kind's rows are a power of two, so every product of a kind is on the same side), and is memory
    # of its own while it lasts: never that of an output layer (1 GiB in float32 for 1B, 2 for 8B).
    return x.shape[0] > 1 and weight.shape[0] * weight.shape[1] * 4 <= WHOLE_COPY_BYTES


def _is_dequantizable_whole(x, weight):
    return _may_copy_whole(x, weight) and not _is_plain(x, weight) and weight.can_dequantize


def _is_float32_block_product(x, weight):
    return _is_bfloat16(x, weight) if _is_plain(x, weight) else weight.can_dequantize_rows


# The built-in kernels' tiles: MPS's int8 kernel takes multiples of 32 rows and inputs, tinygemm
# multiples of 8 rows and of 16 x INNER_K_TILES inputs (a Llama's widths are multiples of both).
BUILT_IN_ROW_MULTIPLE, BUILT_IN_INPUT_MULTIPLE = 32, 16 * INNER_K_TILES
PROBE_SHAPE = (64, 256)  # (out, in) of the matrix each built-in kernel is first tried on
PROBE_ROWS = (3, 32)  # a few rows and many: MPS's int8 kernel is another below 12 rows than above
# Of the largest result. A kernel may round its weights or its result to the activations' dtype
# (bfloat16: a relative 2^-8 each); a layout other than the kernel's gives other numbers altogether.
PROBE_TOLERANCE = 0.02


def built_in_kernel_serves(weight, dtype: torch.dtype) -> bool:
    """Whether PyTorch's built-in kernel for this quantized matrix's scheme multiplies it by
    activations in `dtype` on its device (off the CPU, where DEVICE_KERNELS time it against
    dequantizing)."""
    return (weight.dtype in ("int8", "int4")
            and weight.shape[0] % BUILT_IN_ROW_MULTIPLE == 0 and weight.shape[1] % BUILT_IN_INPUT_MULTIPLE == 0
            and built_in_kernel_agrees(weight.device, weight.dtype, dtype, getattr(weight, "group_size", 0)))


def _has_built_in_kernel(x, weight):
    return not _is_plain(x, weight) and built_in_kernel_serves(weight, x.dtype)


@functools.cache
def built_in_kernel_agrees(device: torch.device, scheme: str, dtype: torch.dtype, group_size: int) -> bool:
    """Whether PyTorch's built-in `scheme` kernel runs on `device` for activations in `dtype` and
    gives the dequantized product of a random probe matrix: False where this PyTorch has no such
    kernel for the device (or the GPU), or where its layout is not the one we pack."""
    if device.type == "meta":  # shapes without numbers: nothing to compare
        return False
    generator = torch.Generator().manual_seed(0)
    matrix, x = torch.randn(PROBE_SHAPE, generator=generator), torch.randn(max(PROBE_ROWS), PROBE_SHAPE[1],
                                                                           generator=generator)
    kernel = _int8_kernel if scheme == "int8" else _built_in_int4_kernel
    try:
        weight = quantized(matrix.to(device, dtype), scheme, group_size, looked_up=False)  # int8 ignores the size
        x = x.to(device, dtype)  # (32, in)
        expected = F.linear(x.float(), weight.dequantize(torch.float32))  # before int4's packing lets go of its codes
        results = [kernel(x[:rows], weight).float() for rows in PROBE_ROWS]
    except (RuntimeError, NotImplementedError, TypeError):  # no such kernel here, or not for this dtype or GPU
        return False
    limit = PROBE_TOLERANCE * expected.abs().max()
    return all(((result - expected[: len(result)]).abs().max() <= limit).item() for result in results)


def _is_dequantized_off_the_cpu(x, weight):
    # int8 keeps its values for its kernel, so both are candidates; an int4 matrix packed for its
    # kernel lets go of its codes, so there the kernel is its only one.
    return not _is_plain(x, weight) and (weight.dtype == "int8" or not _has_built_in_kernel(x, weight))


CPU_KERNELS = (
    Kernel("F.linear", _f_linear, _is_plain),
    Kernel("torch.mv", _matrix_vector, lambda x, weight: x.shape[0] == 1 and _is_plain(x, weight)),
    Kernel("weight @ x.T", _weight_first, lambda x, weight: x.shape[0] > 1 and _is_plain(x, weight)),
    Kernel("F.linear, oneDNN off", _without_onednn(_f_linear), _is_bfloat16),
    Kernel("torch.mv, oneDNN off", _without_onednn(_matrix_vector),
           lambda x, weight: x.shape[0] == 1 and _is_bfloat16(x, weight)),
    Kernel("float32 copy", _float32_copy, lambda x, weight: _may_copy_whole(x, weight) and _is_bfloat16(x, weight)),
    Kernel("float32 blocks", _float32_blocks, _is_float32_block_product),
    Kernel("row blocks", _row_blocks,
           lambda x, weight: _is_plain(x, weight) and weight.shape[0] >= 4 * ROW_BLOCK),
    Kernel("int8 kernel", _int8_kernel, _is_int8),
    Kernel("int4 kernel", _int4_kernel, _is_int4),
    Kernel("fbgemm fp16", _fbgemm_float16, _is_float16),
    Kernel("dequantized", _dequantized, _is_dequantizable_whole),
    Kernel("dequantized to float32", _dequantized_float32, _is_dequantizable_whole),
)


DEVICE_KERNELS = (
    Kernel("F.linear", _f_linear, _is_plain),
    Kernel("int8 kernel", _int8_kernel, lambda x, weight: _is_int8(x, weight) and _has_built_in_kernel(x, weight)),
    Kernel("int4 kernel", _built_in_int4_kernel,
           lambda x, weight: _is_int4(x, weight) and _has_built_in_kernel(x, weight)),
    Kernel("dequantized", _dequantized, _is_dequantized_off_the_cpu),
)


def power_of_two_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def product_kind(rows: int, weight) -> tuple:
    """What a choice is made for: (dtype, weight shape, rows rounded up to a power of two). For a
    quantized matrix the "dtype" also holds what else its candidates depend on (`applies`): the
    activations' dtype (its scales'), int4's group size (a device's built-in kernel may take one and
    not another) and what it can be converted back from. Two models in one process may hold matrices
    of one scheme and shape that differ in those."""
    if isinstance(weight, torch.Tensor):
        dtype = weight.dtype
    else:
        dtype = (weight.dtype, weight.scales_dtype, getattr(weight, "group_size", None), weight.can_dequantize,
                 weight.can_dequantize_rows)
    return (dtype, tuple(weight.shape), power_of_two_at_least(rows))


def _linear_kind(x: torch.Tensor, weight) -> tuple:
    return product_kind(x.shape[0], weight)


@dataclass
class KernelChooser:
    """Computes each product with a kernel, trying every candidate TRIALS times per kind first.

    `kind_of` maps a product's inputs to the kind a choice is made for. `clock` is replaceable so
    that tests can decide which candidate is fastest.
    """

    kernels: tuple
    kind_of: Callable[..., tuple] = _linear_kind
    trials: int = TRIALS
    clock: Callable[[], float] = time.perf_counter
    chosen: dict = field(default_factory=dict)  # kind -> Kernel
    times: dict = field(default_factory=dict)  # kind -> {kernel name: [seconds of each trial]}

    @property
    def trials_run(self) -> int:
        """How many timed trials have run so far: a profile leaves out the steps in which it grew."""
        return sum(len(seconds) for kind in self.times.values() for seconds in kind.values())

    def __call__(self, *inputs) -> torch.Tensor:  # linear: (x (rows, in), weight) -> (rows, out)
        kind = self.kind_of(*inputs)
        kernel = self.chosen.get(kind)
        if kernel is not None:
            return kernel.compute(*inputs)
        return self._trial(kind, inputs)

    def _trial(self, kind: tuple, inputs: tuple) -> torch.Tensor:
        candidates = [kernel for kernel in self.kernels if kernel.applies(*inputs)]
        if not candidates:  # a new kind of weight, say, that no kernel takes yet
            raise NotImplementedError(f"no kernel computes products of kind {kind}: add a Kernel whose `applies` "
                                      "accepts them to CPU_KERNELS or DEVICE_KERNELS (products.py)")
        if len(candidates) == 1:  # nothing to choose between: no timing
            self.chosen[kind] = candidates[0]
            return candidates[0].compute(*inputs)
        times = self.times.setdefault(kind, {kernel.name: [] for kernel in candidates})
        trying = [kernel for kernel in candidates if not self._tried_enough(times, kernel.name)]
        kernel = min(trying, key=lambda candidate: len(times[candidate.name]))  # the least tried
        started = self.clock()
        y = kernel.compute(*inputs)
        times[kernel.name].append(self.clock() - started)
        if all(self._tried_enough(times, candidate.name) for candidate in candidates):
            self.chosen[kind] = min(candidates, key=lambda candidate: min(times[candidate.name]))
        return y

    def _tried_enough(self, times: dict, name: str) -> bool:
        """TRIALS products, or two so slow against the fastest seen that more would only waste time.
        (Two: one slow product may be a weight's first read from its file, not the kernel.)"""
        fastest = min(seconds for trials in times.values() for seconds in trials) if any(times.values()) else 0
        tried = times[name]
        return len(tried) >= self.trials or (len(tried) >= 2 and min(tried) > DROP_FACTOR * fastest)


CPU_CHOOSER = KernelChooser(CPU_KERNELS)
DEVICE_CHOOSERS = {}  # device ("cuda:0", "mps:0") -> its KernelChooser of DEVICE_KERNELS


def synchronized_clock(device: torch.device) -> Callable[[], float]:
    """time.perf_counter once the device has finished the work queued on it: a GPU runs a product
    after the call that queued it has returned."""

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    return clock


def chooser_for(device: torch.device) -> KernelChooser:
    if device.type == "cpu":
        return CPU_CHOOSER
    if device not in DEVICE_CHOOSERS:  # a choice per device: two GPUs of a process may have different kernels
        DEVICE_CHOOSERS[device] = KernelChooser(DEVICE_KERNELS, clock=synchronized_clock(device))
    return DEVICE_CHOOSERS[device]


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight.T, the product of every linear layer.   x: (..., in), weight: (out, in) -> (..., out)

    `weight` is a tensor or a quantized weight (quantize.py), computed by the kernel chosen for
    this kind of product on x's device."""
    y = chooser_for(x.device)(x.reshape(-1, x.shape[-1]), weight)  # (rows, out)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    """The rows of the embedding matrix for token ids: (...) -> (..., dim). A quantized matrix gives
    its rows dequantized, in its scales' dtype (the model's); a lookup reads a few rows, so the time
    is the same either way, and a matrix shared with the output layer stays one."""
    if isinstance(weight, torch.Tensor):
        return F.embedding(ids, weight)
    return weight.rows(ids, weight.scales_dtype)


def chosen_kernel(rows: int, weight) -> str:
    """The name of the kernel this product uses, or "(still timing)"."""
    kernel = chooser_for(weight.device).chosen.get(product_kind(rows, weight))
    return kernel.name if kernel else "(still timing)"


# ------------------------------------------------------------------------------------------------
# Attention: softmax(q @ keys^T / sqrt(head_dim), masked) @ values, chosen the same way
# ------------------------------------------------------------------------------------------------
# A decode step's attention reads every cached key and value: for Llama 3.2 1B at 4,096 cached
# tokens, 128 MiB in bfloat16, a twentieth of what the matrices read. F.scaled_dot_product_attention's
# CPU kernel works in blocks of query rows, which suits a prompt; with one query row per head, and
# where the CPU has no bfloat16 arithmetic, it can read the cache many times below the memory's
# speed (README, "Speed and memory, measured"). So attention is chosen by timing too, per (dtype,
# batch, heads, key/value heads, head_dim, new tokens, cached tokens), the counts rounded up to a
# power of two, among:
#
# - "SDPA": F.scaled_dot_product_attention in the cache's dtype (softmax in float32 inside);
# - "SDPA in float32": the same on float32 copies of q and of the keys and values read;
# - "grouped products in float32": the computation written out as two batched products, the n_rep
#   query heads that share a key/value head stacked as rows of one product. It holds every score at
#   once, so it is a candidate only up to GROUPED_SCORES scores (16 MiB of float32), counted on the
#   kind's rounded-up counts: every product of a kind has the same candidates.
#
# Every candidate takes the same numbers (the cache's), takes the softmax in float32 and adds in
# float32. They differ in the order of the additions, and SDPA in bfloat16 may round the softmax's
# weights to bfloat16 before multiplying the values (a relative 2^-9 each), where the float32
# candidates round only the result. Other devices use SDPA.

GROUPED_SCORES = 2**22  # batch x heads x new tokens x cached tokens


def _sdpa(q, keys, values, mask):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def _sdpa_float32(q, keys, values, mask):
    return _sdpa(q.float(), keys.float(), values.float(), mask).to(q.dtype)


def _grouped_float32(q, keys, values, mask):
    batch, n_heads, seq, head_dim = q.shape
    n_kv_heads = keys.shape[1]
    # Query heads k*n_rep ... k*n_rep + n_rep - 1 read key/value head k: one product per k.
    # The scale goes on the queries, the smaller operand.   rows: (batch, n_kv_heads, n_rep * seq, head_dim)
    rows = q.float().reshape(batch, n_kv_heads, n_heads // n_kv_heads * seq, head_dim) / math.sqrt(head_dim)
    scores = rows @ keys.float().transpose(-1, -2)  # (batch, n_kv_heads, n_rep * seq, kv_len)
    if mask is not None:  # (seq, kv_len), the same for every query head
        scores = scores.unflatten(2, (-1, seq)).masked_fill(~mask, float("-inf")).flatten(2, 3)
    out = scores.softmax(dim=-1) @ values.float()  # (batch, n_kv_heads, n_rep * seq, head_dim)
    return out.view(batch, n_heads, seq, head_dim).to(q.dtype)


def _is_reduced_precision(q, keys, values, mask):
    return q.dtype != torch.float32


def _scores_fit(q, keys, values, mask):
    kind = attention_kind(q, keys, values, mask)
    return kind.batch * kind.n_heads * kind.new_tokens * kind.cached_tokens <= GROUPED_SCORES


ATTENTION_KERNELS = (
    Kernel("SDPA", _sdpa),
    Kernel("SDPA in float32", _sdpa_float32, _is_reduced_precision),
    Kernel("grouped products in float32", _grouped_float32, _scores_fit),
)


class AttentionKind(NamedTuple):
    """What an attention choice is made for. batch, new_tokens and cached_tokens are rounded up to a
    power of two: a decode step's kind changes as the cache grows past each power of two."""

    dtype: torch.dtype
    batch: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    new_tokens: int
    cached_tokens: int


def attention_kind(q, keys, values, mask) -> AttentionKind:
    batch, n_heads, seq, head_dim = q.shape
    return AttentionKind(q.dtype, power_of_two_at_least(batch), n_heads, keys.shape[1], head_dim,
                         power_of_two_at_least(seq), power_of_two_at_least(keys.shape[2]))


ATTENTION_CHOOSER = KernelChooser(ATTENTION_KERNELS, kind_of=attention_kind)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
    """Each query's weighted sum of values, weights softmax(q . key / sqrt(head_dim)) over the keys
    mask allows; query head i reads key/value head i // n_rep.

    q (batch, n_heads, seq, head_dim), keys and values (batch, n_kv_heads, kv_len, head_dim), mask
    (seq, kv_len) bool or None (all allowed) -> (batch, n_heads, seq, head_dim) in q's dtype."""
    if q.device.type != "cpu":
        return _sdpa(q, keys, values, mask)
    return ATTENTION_CHOOSER(q, keys, values, mask)


def chosen_attention(device: torch.device, batch: int) -> str:
    """The attention kernels chosen so far on `device` for decode steps (one new token per
    sequence) of `batch` sequences, with the cache sizes each served, e.g. "SDPA in float32 (cached <= 64); grouped products in float32
    (cached <= 128, 256)"; "SDPA" off the CPU, or "(still timing)"."""
    if device.type != "cpu":
        return "SDPA"
    served = {}  # kernel name -> cache sizes
    for kind, kernel in sorted(ATTENTION_CHOOSER.chosen.items(), key=lambda item: item[0].cached_tokens):
        if kind.batch == power_of_two_at_least(batch) and kind.new_tokens == 1:
            served.setdefault(kernel.name, []).append(str(kind.cached_tokens))
    return "; ".join(f"{name} (cached <= {', '.join(sizes)})" for name, sizes in served.items()) or "(still timing)"


def trials_run() -> int:
    """Timed trials of every chooser so far: a profile leaves out the steps in which this grew."""
    choosers = [CPU_CHOOSER, ATTENTION_CHOOSER, *DEVICE_CHOOSERS.values()]
    return sum(chooser.trials_run for chooser in choosers)
