"""Weight-only quantization: every matrix stored in 8 or 4 bits, multiplied by PyTorch's own kernels.

A decode step reads every weight once, so its speed is at most the memory's speed divided by the
bytes per weight (the kernels' arithmetic can set a lower pace: README, "Measured"): bfloat16 takes
2 bytes, int8 1 (plus a scale per row), int4 half a byte (plus a scale and a zero point per group
of 32). The activations stay in the model's dtype; only the stored weights are rounded, once, when
they are quantized.

- "int8", symmetric, one scale per output row: w ~ q * scale, q in -127..127, scale = max|row| / 127.
  A weight moves by half a step, scale / 2, at most (a little more at the row's extremes, since the
  scale itself is stored in the model's dtype): about 0.4% of the row's largest weight.
- "int4", asymmetric, groups of GROUP_SIZE inputs in each row: w ~ (q - 8) * scale + zero, q in
  0..15, scale = (max - min) / 15 over the group. Sixteen levels are coarse, so each group gets its
  own range; groups of 32 keep the error several times lower than groups of 64 on a trained model
  (the issue that asked for this measured +7.6% perplexity at 32 and +50% at 64).

"fp16" is not a quantization: the same 2 bytes a weight, exact for bfloat16 weights above 6e-5,
packed for PyTorch's fbgemm library, whose half-precision product can be faster where the CPU has no
bfloat16 arithmetic (`Float16Weight`; only the multiplied matrices, not the embedding).

`quantize(model, scheme)` replaces each linear layer's weight (and the embedding, which a Llama 3.2
model shares with its output layer: the shared matrix stays one) by an `Int8Weight` or `Int4Weight`
(fp16: a `Float16Weight`), tensor by tensor, and gives back each bfloat16 original's pages of the
memory-mapped file as it goes, so memory stays near the quantized size. products.py then picks
among the kernels that take each kind of weight by timing them, as it does for bfloat16.

A quantized checkpoint (`python -m llama_models.quantize SRC DST int8`) holds the same weights in a
portable layout: the state dict of a quantized model, so `layers.0.attention.wq.weight.values` and
`...weight.scales` for int8, `...weight.codes` and `...weight.scales_and_zeros` for int4, with
params.json saying {"quantization": {"scheme": "int4", "group_size": 32}}. A model built from such
a params.json holds empty quantized weights (`hold_quantized_weights`) for the file to fill.
"""

import collections
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
from torch import nn

from .args import LlamaError
from .sharding import release_mapped_pages, same_memory

SCHEMES = ("int8", "int4", "fp16")
STORED_SCHEMES = ("int8", "int4")  # what a file can hold (python -m llama_models.quantize); fp16 is packed at load
GROUP_SIZE = 32  # int4: inputs per scale and zero point
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch._weight_int4pack_mm_for_cpu takes
# The CPU int4 kernel's packed layout is converted from ours this many rows at a time: the
# conversion takes 4-byte codes, and a whole output layer of them would be 1 GB.
INT4_PACK_ROWS = 8192
INNER_K_TILES = 8  # torch._convert_weight_to_int4pack (CUDA, MPS): 16-input tiles per 16-byte load


def listed(schemes) -> str:
    """The schemes for a message: "'int8', 'int4' or 'fp16'"."""
    quoted = [repr(scheme) for scheme in schemes]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


class QuantizedWeight(nn.Module):
    """A quantized (out, in) matrix: what products.linear and products.embedding dispatch on.

    A new kind subclasses this, with its numbers in buffers (an nn.Module's `.to(dtype)` casts every
    floating-point buffer: right for scales, which are kept in the model's dtype), and adds its
    kernels to products.py's CPU_KERNELS or DEVICE_KERNELS. A kind whose numbers are not buffers
    overrides what reads them (`_apply`, `device`, `nbytes`, `stored_pieces`, `scales_dtype`), as
    Float16Weight, which holds fbgemm's packed blocks, does.
    """

    kind: str  # "int8", "int4" or "fp16", as in SCHEMES
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple:
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> str:  # products.py tells kinds of products apart by dtype, shape and rows
        return self.kind

    @property
    def scales_dtype(self) -> torch.dtype:
        """The model's dtype, in which the scales are stored and the activations computed: that of
        the first floating-point buffer, which for int8 and int4 is the scales. (Read from the
        module's own buffers, not `buffers()`, which takes microseconds: products.py asks at every product.)"""
        return next(buffer.dtype for buffer in self._buffers.values() if buffer is not None and buffer.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers())

    @property
    def bytes_per_product(self) -> int:
        """What a product reads: all of it, but for int4 only the kernel's layout once it is made."""
        return self.nbytes

    def stored_pieces(self) -> list:
        """(where, bytes) of each piece of memory it holds: a memory report counts a shared one once."""
        return [(buffer.data_ptr(), buffer.nbytes) for buffer in self.buffers()]

    @property
    def can_dequantize(self) -> bool:
        """Whether a product of several rows on the CPU may convert the whole matrix back (`rows`)
        for its length: a kind that implements `rows` says so. (Off the CPU a matrix without a built-in
        kernel there is always dequantized: products.py's DEVICE_KERNELS.)"""
        return False

    @property
    def can_dequantize_rows(self) -> bool:
        """Whether it may convert it back a block of rows at a time (`float32_rows`)."""
        return False

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:  # (out, in)
        return self.rows(torch.arange(self.shape[0], device=self.device), dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # ids (...) -> (..., in)
        raise NotImplementedError

    def float32_rows(self, start: int, out: torch.Tensor) -> None:
        """Rows start, start + 1, ... of the weights, as many as out (rows, in) float32 holds, written
        into it in place: products.py's "float32 blocks" fills its scratch block by block."""
        raise NotImplementedError


class Int8Weight(QuantizedWeight):
    """values (out, in) int8 and scales (out,): w[i, j] ~ values[i, j] * scales[i]."""

    kind = "int8"

    def __init__(self, values: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.register_buffer("values", values)
        self.register_buffer("scales", scales)  # in the model's dtype, as the CPU kernel takes them

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Weight":
        values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
        for rows in row_blocks(weight):
            w = weight[rows].to(torch.float32, copy=True)  # (block, in): scratch, the original untouched
            scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (block,)
            scales[rows] = scale.to(weight.dtype)  # stored rounded: the codes are made for that scale
            values[rows] = w.div_(scales[rows].float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(values, scales)

    @classmethod
    def empty(cls, out: int, width: int, dtype: torch.dtype) -> "Int8Weight":
        """Shapes only, on the meta device, for a quantized checkpoint to fill."""
        return cls(torch.empty(out, width, dtype=torch.int8, device="meta"), torch.empty(out, dtype=dtype, device="meta"))

    can_dequantize = can_dequantize_rows = True

    def rows(self, ids, dtype):
        return self.values[ids].to(dtype) * self.scales[ids, None].to(dtype)

    def float32_rows(self, start, out):
        rows = slice(start, start + out.shape[0])
        out.copy_(self.values[rows]).mul_(self.scales[rows, None])  # exact: q * scale fits a float32


class Int4Weight(QuantizedWeight):
    """codes (out, in / 2) uint8, two 4-bit codes q per byte (column 2k in the low half, 2k+1 in the
    high), and scales_and_zeros (in / group_size, out, 2): w ~ (q - 8) * scale + zero per group.
    Those two are what a state dict holds, the kernel's scales_and_zeros as it takes them.

    The kernels' own packings of the codes depend on the CPU or the GPU, so they are made from them
    where the model runs (`packed`, not saved): the CPU's on the first product or earlier by
    `pack_for_cpu`, CUDA's and MPS's on the first product. A matrix that is only multiplied then
    needs only the packing, and lets go of its codes; one that is also looked up (`looked_up`: an
    embedding, or one shared with the output layer) keeps them.
    """

    kind = "int4"

    def __init__(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, looked_up: bool):
        super().__init__()
        self.out_features, self.in_features, self.group_size = codes.shape[0], codes.shape[1] * 2, group_size
        self.looked_up = looked_up
        self.register_buffer("codes", codes)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("packed", None, persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = GROUP_SIZE, looked_up: bool = False) -> "Int4Weight":
        out, width = weight.shape
        codes = torch.empty(out, width // 2, dtype=torch.uint8, device=weight.device)
        scales_and_zeros = torch.empty(width // group_size, out, 2, dtype=weight.dtype, device=weight.device)
        for rows in row_blocks(weight):
            groups = weight[rows].to(torch.float32, copy=True).unflatten(1, (-1, group_size))  # (block, groups, size)
            low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (block, groups)
            # scale and zero stored rounded to the model's dtype; the codes are made for those
            scale = ((high - low) / 15).clamp_(min=torch.finfo(torch.float32).tiny).to(weight.dtype).float()
            zero = (low + 8 * scale).to(weight.dtype).float()  # (q - 8) * scale + zero = q * scale + low
            low = zero - 8 * scale
            q = groups.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8).flatten(1)
            codes[rows] = q[:, 0::2] | (q[:, 1::2] << 4)  # (block, in / 2)
            scales_and_zeros[:, rows] = torch.stack((scale, zero), dim=-1).transpose(0, 1).to(weight.dtype)
        return cls(codes, scales_and_zeros, group_size, looked_up)

    @classmethod
    def empty(cls, out: int, width: int, dtype: torch.dtype, group_size: int, looked_up: bool) -> "Int4Weight":
        """Shapes only, on the meta device, for a quantized checkpoint to fill."""
        return cls(torch.empty(out, width // 2, dtype=torch.uint8, device="meta"),
                   torch.empty(width // group_size, out, 2, dtype=dtype, device="meta"), group_size, looked_up)

    @property
    def can_dequantize(self) -> bool:  # whole, from the codes that a matrix looked up keeps
        return self.looked_up

    @property
    def can_dequantize_rows(self) -> bool:
        """On the CPU, block by block, also from the kernel's packing where `cpu_int4_layout` knows
        it: never a whole float copy of a matrix that int4 was chosen to keep small."""
        return self.looked_up or self._reshuffled_layout() is not None

    @property
    def bytes_per_product(self) -> int:  # a tied matrix keeps its codes for lookups, which products skip
        return self.nbytes if self.packed is None else self.packed.nbytes + self.scales_and_zeros.nbytes

    def rows(self, ids, dtype):
        if self.codes is not None:
            q = unpack_codes(self.codes[ids], dtype)  # (..., in), a new tensor
        else:
            q = self._code_values(slice(0, self.shape[0]))[ids].to(dtype)
        return self._weights_from_codes_(q, self.scales_and_zeros[:, ids].movedim(0, -2).to(dtype))

    def _weights_from_codes_(self, q: torch.Tensor, scale_and_zero: torch.Tensor) -> torch.Tensor:
        """(q - 8) * scale + zero, in place and in q's dtype.   q (..., in) codes, scale_and_zero (..., groups, 2)"""
        grouped = q.view(*q.shape[:-1], -1, self.group_size)  # (..., groups, group_size)
        grouped.sub_(8).mul_(scale_and_zero[..., :1]).add_(scale_and_zero[..., 1:])
        return q

    def _only_packed(self) -> LlamaError:  # moved to another device, or its numbers asked for
        return LlamaError(f"this int4 matrix kept only the {self.packed.device.type} kernel's packing, not its codes: "
                          "load the model on the device it runs on (load_llama(..., device=...)), or quantize its "
                          "float weights again to read its numbers")

    def _code_values(self, rows: slice) -> torch.Tensor:  # (rows, in) codes 0..15, uint8
        if self.codes is not None:
            return unpack_codes(self.codes[rows])
        if self.packed.device.type != "cpu" or not self.can_dequantize_rows:
            raise self._only_packed()
        return unpack_int4_rows(self.packed[rows], *self._reshuffled_layout())

    def float32_rows(self, start, out):  # as `rows` computes them, with no float-sized temporaries
        out.copy_(self._code_values(slice(start, start + out.shape[0])))
        scale_and_zero = self.scales_and_zeros[:, start : start + out.shape[0]].transpose(0, 1)  # (rows, groups, 2)
        self._weights_from_codes_(out, scale_and_zero)

    def _reshuffled_layout(self) -> Optional[tuple]:
        """cpu_int4_layout() where this matrix's rows are whole blocks of it, so that pack_int4_rows
        makes its packing (and unpack_int4_rows undoes it); None where the kernel's conversion must."""
        layout = cpu_int4_layout()
        return layout if layout is not None and self.shape[0] % layout[0] == 0 else None

    def cpu_packed(self, shard_paths: list = ()) -> torch.Tensor:
        """The codes in the CPU kernel's layout, made on first use. A matrix not `looked_up` then
        lets go of its codes (and their pages of `shard_paths`, if they were read from a file)."""
        if self.packed is None:
            layout = self._reshuffled_layout()
            if layout is not None:
                pack = lambda rows: pack_int4_rows(self.codes[rows], *layout)  # noqa: E731
            else:  # a last block of fewer rows has a layout of its own: the kernel's conversion makes it
                pack = lambda rows: torch._convert_weight_to_int4pack_for_cpu(  # noqa: E731
                    unpack_codes(self.codes[rows], torch.int32), 2)
            packed = torch.empty_like(self.codes)  # the same bytes, reshuffled
            for rows in row_blocks(self.shape[0], INT4_PACK_ROWS):  # one block's scratch at a time
                packed[rows] = pack(rows)
            self.packed = packed
            if not self.looked_up:
                release_mapped_pages(self.codes, list(shard_paths))
                self.codes = None
        return self.packed

    def device_packed(self) -> torch.Tensor:
        """The codes in the layout of torch._weight_int4pack_mm (CUDA, MPS), made on first use; a
        matrix not `looked_up` then lets go of its codes. torch._convert_weight_to_int4pack makes it
        from (out, in / 2) bytes that hold column 2k in the high half, the other way round from ours."""
        if self.packed is None:
            high_first = (self.codes << 4) | (self.codes >> 4)  # (out, in / 2): each byte's halves swapped
            self.packed = torch._convert_weight_to_int4pack(high_first, INNER_K_TILES)
            if not self.looked_up:
                self.codes = None
        return self.packed

    def _apply(self, fn, recurse=True):  # model.to(...): a kernel's packing belongs to its device
        if self.packed is not None and fn(torch.empty(0, device=self.packed.device)).device != self.packed.device:
            if self.codes is None:
                raise self._only_packed()
            self.packed = None  # made again for the kernel where the matrix goes
        return super()._apply(fn, recurse)


# ------------------------------------------------------------------------------------------------
# The CPU int4 kernel's layout, made quickly
# ------------------------------------------------------------------------------------------------
# torch._convert_weight_to_int4pack_for_cpu wants one int32 per weight, and converting to that and
# back takes most of an int4 folder's loading. The layout it makes is simple (PyTorch's
# aten/src/ATen/native/cpu/int4mm_kernel.cpp): the rows in blocks of B
# (four float32 vector widths: 32 with AVX2, 64 with AVX-512), and for each input k, B/2 bytes, byte
# j holding two codes of the block, low nibble first: those of rows j and j + B/2 where the kernel
# is vectorized, of rows 2j and 2j + 1 where not. That is a reshuffle of our bytes, which
# `pack_int4_rows` does in a few byte-wide operations. Which reshuffle this PyTorch uses on this CPU
# is not assumed: `cpu_int4_layout` packs a probe both ways and compares with the kernel's own
# conversion, once per process; if neither matches, the kernel's conversion does all the packing.

INT4_LAYOUTS = ((32, "halves"), (64, "halves"), (32, "pairs"))  # (B, which rows share a byte)


def unpack_codes(codes: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """(..., in / 2) bytes of two codes -> (..., in) codes 0..15 in `dtype`, written straight into it."""
    q = torch.empty(*codes.shape, 2, dtype=dtype, device=codes.device)
    torch.bitwise_and(codes, 15, out=q[..., 0])  # column 2k: the low half of byte k
    torch.bitwise_right_shift(codes, 4, out=q[..., 1])
    return q.flatten(-2)


def pack_int4_rows(codes: torch.Tensor, block: int, pairing: str) -> torch.Tensor:
    """codes (n, in / 2) in our layout -> (n, in / 2) bytes in the kernel's, for n a multiple of block."""
    n, half = codes.shape
    q = unpack_codes(codes).view(n // block, block, 2 * half)  # (blocks, rows of a block, in)
    low, high = (q[:, : block // 2], q[:, block // 2 :]) if pairing == "halves" else (q[:, 0::2], q[:, 1::2])
    packed = (high << 4).bitwise_or_(low)  # (blocks, block / 2, in)
    return packed.transpose(1, 2).reshape(n, half)  # (blocks, in, block / 2): input by input


def unpack_int4_rows(packed: torch.Tensor, block: int, pairing: str) -> torch.Tensor:
    """pack_int4_rows undone: (n, in / 2) bytes in the kernel's layout -> (n, in) codes 0..15."""
    n, half = packed.shape
    bytes_ = packed.view(n // block, 2 * half, block // 2).transpose(1, 2)  # (blocks, block / 2, in)
    q = torch.empty(n // block, block, 2 * half, dtype=torch.uint8)  # (blocks, rows of a block, in)
    low, high = (q[:, : block // 2], q[:, block // 2 :]) if pairing == "halves" else (q[:, 0::2], q[:, 1::2])
    low.copy_(bytes_ & 15)
    high.copy_(bytes_ >> 4)
    return q.view(n, 2 * half)


@functools.cache
def cpu_int4_layout() -> Optional[tuple]:
    """The entry of INT4_LAYOUTS that gives what PyTorch's conversion gives here, or None."""
    probe = torch.randint(0, 256, (128, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = torch._convert_weight_to_int4pack_for_cpu(unpack_codes(probe, torch.int32), 2)  # from (128, 64) codes
    for layout in INT4_LAYOUTS:
        if torch.equal(pack_int4_rows(probe, *layout).flatten(), expected.flatten()):
            return layout
    return None


class Float16Weight(QuantizedWeight):
    """The matrix in float16, packed by PyTorch's fbgemm library for its half-precision product
    (torch.ops.quantized.linear_dynamic_fp16), in blocks of FLOAT16_BLOCK_ROWS rows.

    Not a quantization: float16 holds every bfloat16 number between 6.1e-5 and 65504 in magnitude
    exactly (bfloat16 keeps 8 significant bits, float16 11), and smaller ones to within 6e-8. The
    product multiplies float32 activations by the float16 weights and adds in float32, as the
    "float32 copy" candidate does. What it can buy is speed where the CPU has no bfloat16
    arithmetic: fbgemm's kernel converts float16 with one instruction per vector, for one row and
    for a few (products.py times it against the others). What it costs is fbgemm's packing at every
    load, and a packed matrix cannot be saved in a file (fbgemm saves it by unpacking it) or moved
    off the CPU.
    """

    kind = "fp16"

    def __init__(self, blocks: list, out_features: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        self.blocks, self.out_features, self.in_features, self.model_dtype = blocks, out_features, in_features, dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Float16Weight":
        blocks = [torch.ops.quantized.linear_prepack_fp16(weight[rows].float(), None)  # float32 scratch of one block
                  for rows in row_blocks(weight, FLOAT16_BLOCK_ROWS)]
        return cls(blocks, *weight.shape, weight.dtype)

    @property
    def scales_dtype(self) -> torch.dtype:
        return self.model_dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * 2

    def stored_pieces(self) -> list:
        return [(id(self), self.nbytes)]

    def product(self, x: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (rows, out), in x's dtype
        x = x.float()
        parts = [torch.ops.quantized.linear_dynamic_fp16(x, block) for block in self.blocks]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(self.model_dtype)

    # Not `can_dequantize`, for several rows either: unpacking would only add work to the same sums.
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:  # (out, in): the weights back, block by block
        out = torch.empty(self.shape, dtype=dtype)
        for rows, block in zip(row_blocks(self.out_features, FLOAT16_BLOCK_ROWS), self.blocks):
            out[rows] = torch.ops.quantized.linear_unpack_fp16(block)[0]
        return out

    def rows(self, ids, dtype):
        raise LlamaError("fp16 packs only the matrices that are multiplied; an embedding stays as it was")

    def _apply(self, fn, recurse=True):  # model.to(...): fbgemm's packing lives on the CPU only
        probe = fn(torch.empty(0, dtype=self.model_dtype))
        if probe.device.type != "cpu":
            raise LlamaError(f"fp16 matrices are packed for the CPU's fbgemm library and cannot move to "
                             f"{probe.device.type}: load the bfloat16 weights there (on a GPU, DTYPE = 'float16')")
        self.model_dtype = probe.dtype  # the activations' dtype, which products return
        return super()._apply(fn, recurse)


FLOAT16_BLOCK_ROWS = 16384  # the output layer is packed (and multiplied) in 8 such blocks
# Matrices packed at once, each with a float32 copy of one block (8B's w1: 235 MB) while it packs.
FP16_PACKING_THREADS = 4


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantized(weight: torch.Tensor, scheme: str, group_size: int, looked_up: bool):
    """The `scheme` form of one float (out, in) matrix."""
    if scheme == "int8":
        return Int8Weight.from_float(weight)
    if scheme == "fp16":
        return Float16Weight.from_float(weight)
    if scheme == "int4":
        return Int4Weight.from_float(weight, group_size, looked_up)
    raise ValueError(f"no quantized form for {scheme!r}")  # check_scheme names the schemes to the user


def empty_quantized(out: int, width: int, dtype: torch.dtype, scheme: str, group_size: int, looked_up: bool):
    """An (out, width) `scheme` matrix with scales in `dtype`, of shapes only (the meta device)."""
    if scheme == "int8":
        return Int8Weight.empty(out, width, dtype)
    if scheme == "int4":
        return Int4Weight.empty(out, width, dtype, group_size, looked_up)
    raise ValueError(f"a file holds no {scheme!r} matrices")  # STORED_SCHEMES


def row_blocks(weight_or_rows, block: int = 4096):
    """Slices of a matrix's rows (or of this many rows): working block by block keeps scratch small."""
    rows = weight_or_rows if isinstance(weight_or_rows, int) else weight_or_rows.shape[0]
    return [slice(start, start + block) for start in range(0, rows, block)]


def check_scheme(scheme: str, widths, group_size: int, rows=()) -> None:
    """One line for an unknown scheme, or an int4 group size that PyTorch's kernel does not take or
    that does not divide every input width (and int4 needs output rows in multiples of 16)."""
    if scheme not in SCHEMES:
        raise LlamaError(f"unknown quantization {scheme!r}: use None, {listed(SCHEMES)}")
    if scheme == "fp16" and not fbgemm_available():
        raise LlamaError("fp16 packs the matrices for PyTorch's fbgemm library, which this PyTorch build lacks "
                         f"(it comes with x86 builds): use None, {listed(STORED_SCHEMES)}")
    if scheme != "int4":
        return
    if type(group_size) is not int or group_size not in INT4_GROUP_SIZES:  # 32.0 and True are not sizes
        raise LlamaError(f"int4 group size {group_size!r} is not one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                         f"the sizes PyTorch's int4 kernel takes: use {GROUP_SIZE}")
    bad = sorted({width for width in widths if width % group_size})
    if bad:
        raise LlamaError(f"int4 group size {group_size} does not divide the input width {bad[0]}: "
                         f"use one that divides {math.gcd(*bad)}, or int8")
    odd = sorted({count for count in rows if count % 16})
    if odd:
        raise LlamaError(f"int4 needs matrices of a multiple of 16 rows, and one has {odd[0]}: use int8")


def quantized_modules(model: nn.Module) -> list:
    """(module, its weight) of every matrix: the linear layers and the embedding, largest first."""
    modules = [module for module in model.modules() if hasattr(module, "weight") and module.weight.dim() == 2]
    return sorted(modules, key=lambda module: module.weight.numel(), reverse=True)


def quantize(model: nn.Module, scheme: str, group_size: int = GROUP_SIZE, shard_paths: list = (),
             progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Replace every matrix weight of `model` by its `scheme` form, in place, one at a time.

    Each original is freed once replaced (its pages of the files in `shard_paths` given back), and
    a matrix shared by two modules (a tied embedding and output layer) is quantized once and stays
    shared. `progress(done, total)` is called after each matrix.
    """
    if any(isinstance(module, QuantizedWeight) for module in model.modules()):
        raise LlamaError("the model is already quantized: load the bfloat16 checkpoint to quantize it another way")
    modules = quantized_modules(model)
    if scheme == "fp16":  # lookups read a few rows of the original: only the products gain from packing
        modules = [module for module in modules if not is_embedding(module)]
        if any(module.weight.device.type != "cpu" for module in modules):
            raise LlamaError("fp16 packs the matrices for the CPU's fbgemm library: on a GPU use DTYPE = 'float16' "
                             "(dtype=torch.float16) instead")
    check_scheme(scheme, [module.weight.shape[1] for module in modules], group_size,
                 [module.weight.shape[0] for module in modules])
    holders = {}  # where an original's numbers lie -> the modules using it: a tied matrix is two parameters
    for module in modules:
        holders.setdefault(same_memory(module.weight), []).append(module)

    def make(users: list):  # the quantized form of the matrix these modules share
        return quantized(users[0].weight, scheme, group_size, looked_up=any(is_embedding(user) for user in users))

    # fbgemm packs a matrix on one thread, so fp16 packs one matrix per thread; the int8 and int4
    # conversions already use every thread.
    workers = min(torch.get_num_threads(), FP16_PACKING_THREADS) if scheme == "fp16" else 1
    made = in_order_with_lookahead(make, list(holders.values()), workers)
    for count, (users, weight) in enumerate(zip(holders.values(), made), start=1):
        original = users[0].weight
        for user in users:
            del user.weight  # the parameter
            user.weight = weight  # a submodule now: its buffers move with model.to()
        release_mapped_pages(original, list(shard_paths))
        del original
        pack_for_cpu(users)  # int4: now, so that no matrix holds both layouts for long
        if progress:
            progress(count, len(holders))


def in_order_with_lookahead(function: Callable, items: list, workers: int):
    """function(item) for each item, in order, computed by `workers` threads at most `workers`
    items ahead of the caller (so that no more than that many originals wait to be released)."""
    if workers == 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def is_embedding(module: nn.Module) -> bool:
    return hasattr(module, "num_embeddings")


def hold_quantized_weights(model: nn.Module, scheme: str, group_size: Optional[int]) -> None:
    """Give every matrix of a freshly built `model` an empty `scheme` weight of its shape, in place
    of its float placeholder, so that a quantized checkpoint's state dict fits it."""
    modules = quantized_modules(model)
    check_scheme(scheme, [module.weight.shape[1] for module in modules], group_size,
                 [module.weight.shape[0] for module in modules])
    for module in modules:
        (out, width), dtype = module.weight.shape, module.weight.dtype
        del module.weight
        module.weight = empty_quantized(out, width, dtype, scheme, group_size, looked_up=is_embedding(module))


def pack_for_cpu(model_or_modules, shard_paths: list = ()) -> None:
    """Make the CPU kernel's layout of every int4 matrix that is multiplied, now rather than on its
    first product, so that loading takes the time and the codes' pages of `shard_paths` go back."""
    modules = model_or_modules.modules() if isinstance(model_or_modules, nn.Module) else model_or_modules
    for module in modules:
        weight = getattr(module, "weight", None)
        if isinstance(weight, Int4Weight) and weight.device.type == "cpu" and not is_embedding(module):
            weight.cpu_packed(shard_paths)
