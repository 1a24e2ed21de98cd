"""Model parallelism: which slice of every weight each process holds, cut from any number of shards.

A model too big for one device (70B: 141 GB in bfloat16) runs as N processes started by torchrun,
one per GPU, on one machine or several. Each process holds 1/N of every large matrix, and fairscale's
layers (model.py) exchange the partial results. How a matrix is split follows from how it is used:

    column-parallel   wq wk wv w1 w3 output   split the rows (dim 0, the outputs): each process
                                              computes its own heads, hidden units or vocabulary scores
    row-parallel      wo w2                   split the columns (dim 1, the inputs): each process reads
                                              only the heads or hidden units it computed, and the
                                              partial sums are added up across processes
    vocabulary rows   tok_embeddings          split the rows (dim 0): each process looks up the token
                                              ids it owns, the others contribute zeros
    replicated        the RMSNorm weights     small vectors that every process needs whole

Meta saves a model as S shards, consolidated.00.pth ... : shard s is exactly what process s of S
holds. Here, any process count N that divides S, or that S divides, works:

    N == S   process r uses shard r as it is
    N <  S   process r glues its S/N neighbouring shards together (N = 1 merges the whole model)
    N >  S   process r cuts its part out of one shard

The shards are memory-mapped, so a process reads only the bytes of its own slices from disk, and
never holds a whole unsharded matrix it does not need.

Key/value heads: grouped-query attention gives Llama 3 only 8 KV heads, and a process cannot hold
part of a head. With more processes than KV heads, each head is repeated, so that processes 2k and
2k+1 of 16 both hold head k (Meta ships 405B for 16 GPUs this way); the model is then built with
n_kv_heads = N, and each query head still meets the same keys and values as before.
"""

import ctypes
import functools
import math
import mmap
import os
import pickle
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from .args import LlamaError, ModelArgs, first_line

# The dimension along which each weight is split across processes; weights not listed (the norms)
# are replicated. Names are given without their "layers.{i}." prefix.
SPLIT_DIM = {
    "tok_embeddings.weight": 0,  # VocabParallelEmbedding: vocabulary rows
    "attention.wq.weight": 0,  # ColumnParallelLinear: output features
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,
    "attention.wo.weight": 1,  # RowParallelLinear: input features
    "feed_forward.w2.weight": 1,
}
KV_WEIGHTS = ("attention.wk.weight", "attention.wv.weight")
# A quantized folder (quantize.py) stores each matrix as parts named after it ("...wq.weight.values").
# Per part, the dimension that holds the matrix's split dimension 0 (rows) or 1 (columns); None: the
# part is replicated (int8 keeps a scale per output row, and every process has every row of wo, w2).
QUANTIZED_PART_SPLIT = {
    "values": {0: 0, 1: 1},  # int8 (out, in)
    "scales": {0: 0, 1: None},  # int8 (out,)
    "codes": {0: 0, 1: 1},  # int4 (out, in / 2)
    "scales_and_zeros": {0: 1, 1: 0},  # int4 (in / group_size, out, 2)
}


def without_layer_prefix(name: str) -> str:
    """"layers.3.attention.wq.weight" -> "attention.wq.weight"; other names are returned as they are."""
    if name.startswith("layers."):
        return name.split(".", 2)[2]
    return name


def split_dim(role: str) -> Optional[int]:
    """The dimension along which the tensor of this role ("attention.wq.weight", or a quantized part
    "attention.wq.weight.scales") is split across processes, or None if every process has it whole."""
    if role in SPLIT_DIM:
        return SPLIT_DIM[role]
    matrix, _, part = role.rpartition(".")
    if matrix in SPLIT_DIM and part in QUANTIZED_PART_SPLIT:
        return QUANTIZED_PART_SPLIT[part][SPLIT_DIM[matrix]]
    return None


def matrix_role(role: str) -> str:
    """"attention.wk.weight.codes" -> "attention.wk.weight": the matrix a quantized part belongs to."""
    matrix, _, part = role.rpartition(".")
    return matrix if part in QUANTIZED_PART_SPLIT else role


def same_memory(tensor: torch.Tensor) -> tuple:
    """Equal for two tensors that view the same numbers, even as different Python objects."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride())


# ------------------------------------------------------------------------------------------------
# Which process counts work
# ------------------------------------------------------------------------------------------------


def why_world_size_does_not_fit(args: ModelArgs, n_shards: int, world_size: int) -> Optional[str]:
    """Why `world_size` processes cannot share a checkpoint of this shape stored as `n_shards` shards
    (a phrase to follow "cannot be split N ways:"), or None where they can."""
    if not (n_shards % world_size == 0 or world_size % n_shards == 0):
        return f"its {n_shards} shard(s) cannot be cut or glued into {world_size}"
    # Fewer processes than KV heads: each takes a whole number of heads. More: each head is repeated.
    if not (args.n_kv_heads % world_size == 0 or world_size % args.n_kv_heads == 0):
        return f"its {args.n_kv_heads} key/value heads cannot be shared out evenly"
    for name, size in (("query heads", args.n_heads), ("feed-forward units", args.ffn_hidden_dim),
                       ("vocabulary tokens", args.vocab_size)):
        if size % world_size:
            return f"its {size} {name} cannot be shared out evenly"
    # An int4 folder's groups of inputs cannot be cut: wo and w2 split their inputs (dim, ffn width).
    group_size = args.group_size
    for width in (args.dim, args.ffn_hidden_dim) if group_size else ():
        if (width // world_size) % group_size:
            return f"its int4 groups of {group_size} inputs would be cut ({width} inputs, {width // world_size} a process)"
    return None


def fits_world_size(args: ModelArgs, n_shards: int, world_size: int) -> bool:
    return why_world_size_does_not_fit(args, n_shards, world_size) is None


def valid_world_sizes(args: ModelArgs, n_shards: int = 1) -> list[int]:
    """The process counts that work (at least one query head per process). 70B, 8 shards: 1 2 4 ... 64."""
    return [size for size in range(1, args.n_heads + 1) if fits_world_size(args, n_shards, size)]


def check_world_size(args: ModelArgs, n_shards: int, world_size: int, folder: Path = None) -> None:
    """Refuse, in one line naming the reason and the counts that work, a process count that does not fit."""
    reason = why_world_size_does_not_fit(args, n_shards, world_size)
    if reason is not None:
        sizes = valid_world_sizes(args, n_shards)
        # A folder's check serves the reshard tool too, whose count is of shards.
        what, unit = (folder, "processes (or shards)") if folder is not None else ("the model", "processes")
        counts = f"use one of {', '.join(map(str, sizes))} {unit}" if len(sizes) > 1 else "only 1 fits"
        raise LlamaError(f"{what} cannot be split {world_size} ways: {reason}; {counts}")


def args_for_model_parallel(args: ModelArgs, world_size: int) -> ModelArgs:
    """The model's shape when `world_size` processes share it: KV heads repeated so that each has one.

    Every process needs the same whole number of KV heads: the fewest heads that allows is the least
    common multiple of n_kv_heads and N (n_kv_heads itself for N <= n_kv_heads, else N).
    """
    check_world_size(args, 1, world_size)
    return replace(args, n_kv_heads=math.lcm(args.n_kv_heads, world_size))


# ------------------------------------------------------------------------------------------------
# Reading the shards
# ------------------------------------------------------------------------------------------------


def read_shard(path: Path) -> dict:
    """Memory-map one consolidated.NN.pth. `weights_only` refuses pickled code, only tensors load."""
    if path.is_symlink() and not path.exists():  # in a Hugging Face cache: a blob deleted, or that never came
        raise LlamaError(f"{path} links to {os.readlink(path)}, which does not exist: download the checkpoint again")
    if path.is_dir():
        raise LlamaError(f"{path} is a folder where the file of weights should be: download the checkpoint again")
    try:
        if path.stat().st_size == 0:  # torch.load would blame the file's zip format
            raise LlamaError(f"{path} is empty: the download did not finish; download it again")
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        found = re.search(r"GLOBAL (\S+)", str(error))  # weights_only met a name to call: code, not tensors
        if found:
            raise LlamaError(
                f"{path} holds Python objects that are not tensors ({found.group(1)}): a Llama checkpoint "
                "holds only tensors and loading one never runs code, so this file is not loaded; download "
                "the checkpoint again from Meta"
            ) from None
        if isinstance(error, OSError):  # the file system's reason, such as permission denied
            raise LlamaError(f"{path} could not be read ({first_line(error)}): check that this user may read it") from None
        # PyTorch's own text for a damaged zip asks to re-save the file, or calls itself an internal error.
        raise LlamaError(
            f"{path} could not be read as PyTorch weights: the file is truncated or not a checkpoint; download it again"
        ) from None
    if not isinstance(state_dict, dict):
        raise LlamaError(f"{path} holds a {type(state_dict).__name__}, not a dict of tensors: it is not a Llama checkpoint")
    for name, value in state_dict.items():  # a model saved from the meta device, say, has shapes but no numbers
        if isinstance(value, torch.Tensor) and (value.device.type == "meta" or value.layout != torch.strided):
            kind = "a meta tensor, with no numbers" if value.device.type == "meta" else f"a {value.layout} tensor"
            raise LlamaError(f"tensor {name!r} in {path} is {kind}: the file was not written for Llama; download "
                             "the checkpoint again")
    return state_dict


# ------------------------------------------------------------------------------------------------
# Giving back the pages of tensors copied out of the files
# ------------------------------------------------------------------------------------------------
# Loading copies a tensor out of the mapped file when it converts it (bfloat16 to float32, CPU to
# GPU) or glues shards together. The copied-from pages would stay in this process's memory until
# the file's last tensor is gone, at the end of loading: a float32 load would peak at the float32
# weights plus the whole bfloat16 file (1.5x). madvise(MADV_DONTNEED) drops them at once.
#
# Why that loses nothing: torch.load maps the file privately (copy-on-write), and a dropped page
# that was never written to is read back from the file (or the kernel's page cache) if it is ever
# touched again. Two rules keep it so:
# - Nothing may write to a mapped tensor before it is released. torch.load itself writes only to swap
#   the byte order on a big-endian machine, where nothing is released.
# - Only addresses inside a mapping of a shard file are released, checked at the moment of release
#   while the tensor (and so its mapping) is alive. On ordinary memory MADV_DONTNEED would erase the
#   numbers.
# Linux only: the mappings are read from /proc/self/maps.


def shard_mappings(shard_paths: list) -> list[range]:
    """The address ranges where this process has memory-mapped any of these files (Linux; [] elsewhere)."""
    if not sys.platform.startswith("linux") or sys.byteorder != "little":
        return []
    wanted = {os.path.realpath(path) for path in shard_paths}
    mappings = []
    try:
        # surrogateescape: other mapped files' names need not be valid UTF-8 (realpath decodes alike).
        with open("/proc/self/maps", errors="surrogateescape") as maps:
            for line in maps:  # "7fac3a600000-7facae607000 rw-p 00000000 fe:00 2146490    /path/to/file"
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in wanted:
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    mappings.append(range(start, end))
    except OSError:  # no /proc: then nothing is released, which is only slower on memory
        return []
    return mappings


def release_mapped_pages(tensor: torch.Tensor, shard_paths: list) -> None:
    """Drop from this process's memory the whole pages within `tensor`'s span of bytes, if they lie in
    a mapping of one of `shard_paths`. Pages it shares with its neighbours are kept.

    A strided view (a block of columns) spans the other columns between its rows too; those pages
    are dropped with it and read back from the file if anyone uses them later.
    """
    if tensor.numel() == 0:
        return
    last_element = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    first_byte = tensor.data_ptr()
    end_byte = first_byte + (last_element + 1) * tensor.element_size()
    start = (first_byte + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE  # round inwards to whole pages
    end = end_byte // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start and inside_one_mapping(start, end, shard_mappings(shard_paths)):
        # A refusal (non-zero result) only means the pages stay until the file is closed.
        _madvise()(start, end - start, mmap.MADV_DONTNEED)


def inside_one_mapping(start: int, end: int, mappings: list[range]) -> bool:
    return any(start in mapping and end - 1 in mapping for mapping in mappings)


@functools.cache
def _madvise():
    """The C library's madvise(address, length, advice), with its argument types declared: untyped,
    ctypes would pass Python ints as 32-bit C ints and cut 64-bit addresses short."""
    madvise = ctypes.CDLL(None).madvise  # CDLL(None): the C library already loaded in this process
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


class ShardFiles:
    """The consolidated.NN.pth files of a checkpoint, each memory-mapped the first time it is used."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._mapped = {}  # shard index -> {name: tensor}

    def __len__(self) -> int:
        return len(self.paths)

    def _shard(self, index: int) -> dict:
        if index not in self._mapped:
            self._mapped[index] = read_shard(self.paths[index])
        return self._mapped[index]

    def tensor_names(self, index: int) -> list[str]:
        return [name for name, value in self._shard(index).items() if isinstance(value, torch.Tensor)]

    def tensor(self, index: int, name: str) -> torch.Tensor:
        """The tensor `name` of shard `index`, of the same shape as in the lowest-numbered shard
        mapped: every shard holds an equal slice (or a whole copy) of each tensor."""
        shard = self._shard(index)
        if name not in shard:
            raise LlamaError(
                f"{self.paths[index]} has no tensor {name!r} although other shards have: "
                "the shards come from different downloads; download the model again"
            )
        first = min(self._mapped)
        if name in self._mapped[first] and self._mapped[first][name].shape != shard[name].shape:
            raise LlamaError(
                f"tensor {name!r} has shape {tuple(shard[name].shape)} in {self.paths[index]} but "
                f"{tuple(self._mapped[first][name].shape)} in {self.paths[first]}: the shards come from different "
                "downloads, or one is damaged; download the model again"
            )
        return shard[name]

    def whole_shape(self, name: str) -> tuple:
        """Tensor `name`'s shape in one piece: the shards' slices along its split dimension, added up."""
        pieces = [self.tensor(index, name) for index in range(len(self))]  # each checked against the first
        shape, dim = list(pieces[0].shape), split_dim(without_layer_prefix(name))
        if dim is not None and dim < len(shape):  # (with too few dimensions, the loader's shape check names it)
            shape[dim] *= len(self)
        return tuple(shape)

    def release(self, tensor: torch.Tensor) -> None:
        """Call after copying `tensor` out of a shard: its pages leave this process's memory."""
        release_mapped_pages(tensor, self.paths)


# ------------------------------------------------------------------------------------------------
# One process's slices
# ------------------------------------------------------------------------------------------------


def first_shard_of(rank: int, n_shards: int, world_size: int) -> int:
    """The first (or only) shard process `rank` of `world_size` reads: each reads n_shards / world_size
    of them, or world_size / n_shards processes share one."""
    return rank * n_shards // world_size


def local_state_dict(shard_paths: list[Path], rank: int, world_size: int, args: ModelArgs) -> dict:
    """Process `rank`'s slice of every tensor, for `world_size` processes; {name: tensor}.

    args: the shape of the model being loaded (from args_for_model_parallel, so n_kv_heads may exceed
    the files' heads). Row slices are views into the memory-mapped files: nothing is copied or read
    from disk until the tensor is used or converted.
    """
    shards = ShardFiles(shard_paths)
    first_shard = first_shard_of(rank, len(shards), world_size)
    tensors = {}
    for name in shards.tensor_names(first_shard):
        role = without_layer_prefix(name)
        dim = split_dim(role)
        if dim is None:  # the norms (and int8 scales of wo, w2): whole in every shard. Unknown tensors too; the loader refuses them.
            tensors[name] = shards.tensor(first_shard, name)
        elif matrix_role(role) in KV_WEIGHTS:
            tensors[name] = kv_heads_for_rank(shards, name, dim, rank, world_size, args)
        else:
            tensors[name] = slice_for_rank(shards, name, dim, rank, world_size)
    return tensors


def slice_for_rank(shards: ShardFiles, name: str, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Process `rank`'s 1/world_size of tensor `name`, split along `dim` as if it were one tensor."""
    n_shards = len(shards)
    if world_size <= n_shards:  # this process's S/N shards, glued together (N == S: its own shard)
        per_process = n_shards // world_size
        pieces = [shards.tensor(index, name) for index in range(rank * per_process, (rank + 1) * per_process)]
        if per_process == 1:
            return pieces[0]
        glued = torch.cat(pieces, dim)
        for piece in pieces:
            shards.release(piece)
        return glued
    per_shard = world_size // n_shards  # N/S processes share a shard: cut out this process's part
    stored = shards.tensor(rank // per_shard, name)
    size = stored.shape[dim] // per_shard
    part = stored.narrow(dim, (rank % per_shard) * size, size)
    # Rows (dim 0) are a contiguous view into the mapped file, and contiguous() returns them as they
    # are. Columns (dim 1) are strided, and matrix products want compact rows: they are copied out.
    # Rows of a few KiB share their pages with the other processes' columns, so the copy reads in
    # most of the matrix's pages, and `release` drops them again.
    compact = part.contiguous()
    if compact is not part:
        shards.release(part)
    return compact


def kv_heads_for_rank(shards: ShardFiles, name: str, dim: int, rank: int, world_size: int,
                      args: ModelArgs) -> torch.Tensor:
    """Process `rank`'s key or value heads (their rows, along `dim` of the tensor `name`); repeated
    when there are more processes than heads.

    args.n_kv_heads == N and the files hold fewer heads: each process gets one head, and the N/heads
    processes that share a head are neighbours, so process r gets head r // (N/heads).
    """
    first_shard = first_shard_of(rank, len(shards), world_size)
    stored_heads = shards.tensor(first_shard, name).shape[dim] * len(shards) // args.head_dim
    if world_size > stored_heads and args.n_kv_heads == world_size:
        return slice_for_rank(shards, name, dim, rank // (world_size // stored_heads), stored_heads)
    # Otherwise a plain row block. If params.json disagrees with the files, the loader's shape check says so.
    return slice_for_rank(shards, name, dim, rank, world_size)
