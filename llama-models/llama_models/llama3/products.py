"""Matrix products on the CPU: which PyTorch kernel computes x @ W.T, and in which dtype.

The model's arithmetic is the same everywhere; how fast PyTorch does it on a CPU depends on the chip,
and the difference is large enough to choose per chip. Two kinds of product set a Llama's speed:

- A decode step multiplies one row (the new token) by every weight matrix, a beam-search step a few
  rows (one per beam). Each weight is used once per step, and the time goes into streaming the
  weights from memory, so the best kernel is the one that streams fastest.
- A prompt multiplies all its rows (tokens) by every matrix. Each weight is used once per row, so
  the time goes into arithmetic. CPUs with bfloat16 instructions (x86 with AVX512-BF16 or AMX,
  ARM with BF16) multiply bfloat16 faster than float32. Without them (x86 with AVX2 only, as in most
  laptops, or AVX-512 without BF16), PyTorch converts every bfloat16 element as it multiplies, and
  converting a whole matrix to float32 first, then multiplying that, is several times faster.

Measured on a 2-core Xeon with AMX, natively and with the CPU kernels capped at AVX2 (the
environment variables ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2; benchmarks/bench.py --emulate-avx2 sets them), Llama 3.2 1B in
bfloat16, each pair in one interleaved A/B run:

                              with bfloat16 instructions        without (capped at AVX2)
    decode step (one row)     torch.mv               105 ms     F.linear               166 ms
                              (F.linear              133 ms)    (torch.mv              181 ms)
    beam step (4 rows)        weight @ x.T           118 ms     F.linear               390 ms
                              (F.linear              140 ms)    (weight @ x.T          650 ms)
    prompt of 128 tokens      bfloat16 products     0.33 s      float32 products      2.63 s
                              (float32 products     2.09 s)     (bfloat16 products    7.46 s)

With bfloat16 instructions, the weight goes on the left. torch.mv hands oneDNN (Intel's kernel
library inside PyTorch) the product as the weight (out, in) times one column, and torch.mm(weight,
x.T) as the weight times a few columns: its bfloat16 kernels stream the weight faster in that shape
than in F.linear's rows times the transposed weight (for 2 to 384 rows; from 512 rows on the two are
even). Without bfloat16 instructions oneDNN takes no bfloat16 product, and PyTorch's own kernels
are faster with F.linear's shape. That the weight-first shapes win wherever bfloat16 products are
fast is measured on this Xeon only; ARM CPUs with bfloat16 follow the same rule untested.

Which column applies is measured, not guessed from CPU names: `cpu_multiplies_bfloat16_fast` times a
small bfloat16 product against the same product in float32, once per process (a few milliseconds;
here bfloat16 won by 5x natively, and float32 by 1.4x to 3.5x when capped at AVX2). It answers
"does this CPU have bfloat16 arithmetic", not "from how many rows does float32 pay": that is
MIN_ROWS_FOR_FLOAT32, measured on real 1B matrices. Float32 weights, float16 and GPUs always use
F.linear (for float32, torch.mv and F.linear stream equally fast here, 31.8 and 32.0 GB/s).

Every choice computes the same sums with float32 accumulation; only the order of the additions
differs. Attention needs no such choice: F.scaled_dot_product_attention (model.py) converts bfloat16
to float32 block by block itself, and ran as fast as on float32 inputs when capped at AVX2.
"""

import functools
import time

import torch
import torch.nn.functional as F

# Converting a weight matrix to float32 costs about as much as multiplying 32 rows by it in bfloat16
# on a CPU without bfloat16 instructions (an 8192 x 2048 matrix capped at AVX2: float32 1.1x faster at
# 32 rows, 3x faster at 128), so products of fewer rows (decode steps, beams) stay in bfloat16.
MIN_ROWS_FOR_FLOAT32 = 32


def _best_time(product, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product()
        times.append(time.perf_counter() - started)
    return min(times)  # interference from other processes only ever adds time


@functools.cache
def cpu_multiplies_bfloat16_fast() -> bool:
    """True if this CPU multiplies bfloat16 faster than it converts to float32 and multiplies that,
    i.e. has bfloat16 arithmetic. Measured on first use, then remembered for the process."""
    x = torch.full((MIN_ROWS_FOR_FLOAT32, 1024), 0.5, dtype=torch.bfloat16, device="cpu")  # (rows, in)
    weight = torch.full((1024, 1024), 0.25, dtype=torch.bfloat16, device="cpu")  # (out, in)
    in_bfloat16 = _best_time(lambda: F.linear(x, weight))
    in_float32 = _best_time(lambda: F.linear(x.float(), weight.float()))
    return in_bfloat16 < in_float32


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, the product of every linear layer, with the kernel and dtype chosen as the table
    at the top of this file says.   x: (..., in), weight: (out, in) -> (..., out)"""
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        fast_bfloat16 = cpu_multiplies_bfloat16_fast()
        if rows == 1 and fast_bfloat16:  # a decode step
            return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
        if fast_bfloat16:  # beams and prompts: (out, in) @ (in, rows), the weight on the left
            y_columns = torch.mm(weight, x.reshape(rows, -1).T)  # (out, rows)
            return y_columns.T.contiguous().view(*x.shape[:-1], weight.shape[0])  # (..., out)
        if rows >= MIN_ROWS_FOR_FLOAT32:  # a prompt
            # .float() makes a float32 copy of this one matrix, freed right after the product:
            # never a second resident copy of the weights.
            return F.linear(x.float(), weight.float()).type_as(x)
    return F.linear(x, weight)
