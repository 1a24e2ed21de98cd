"""Tiny random checkpoints in Meta's exact layout, for the tests.

`write_checkpoint(folder, TINY_SHAPES["gqa4"])` writes what a Meta download holds:

    params.json          the fields Meta ships (dim, n_layers, ... use_scaled_rope)
    tokenizer.model      a byte-level tokenizer (256 tokens), or the real one
    consolidated.00.pth  {name: bfloat16 tensor} with Meta's key names and shapes

Key names and shapes are written out here from Meta's published layout (not taken from our model),
so a mistake in the model's module names or shape arithmetic shows up as a failed load.
"""

import json
import shutil
from pathlib import Path

import torch

from tokenizer_files import write_byte_level_tokenizer

N_SPECIAL_TOKENS = 256

# Small shapes covering what real checkpoints vary in: grouped-query ratio (n_heads / n_kv_heads =
# 1, 3, 4), Llama 3.1 RoPE scaling on and off, ffn_dim_multiplier set and unset, and a separate
# `output.weight` or none (Llama 3.2 ties it to the embedding).
TINY_SHAPES = {
    "gqa1": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32, ffn_dim_multiplier=None,
                 use_scaled_rope=False, with_output=True),
    "gqa3": dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=1.3,
                 use_scaled_rope=True, with_output=True),
    "gqa4": dict(dim=128, n_layers=3, n_heads=8, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.5,
                 use_scaled_rope=True, with_output=False),
}


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier) -> int:
    """Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


def meta_tensor_shapes(shape: dict, vocab_size: int) -> dict:
    """{key: shape} of a single-shard Meta checkpoint (see the facts file, section 1.2)."""
    dim, head_dim = shape["dim"], shape["dim"] // shape["n_heads"]
    kv_width = shape["n_kv_heads"] * head_dim
    hidden = ffn_hidden_dim(dim, shape["multiple_of"], shape["ffn_dim_multiplier"])
    shapes = {"tok_embeddings.weight": (vocab_size, dim)}
    for i in range(shape["n_layers"]):
        shapes |= {
            f"layers.{i}.attention.wq.weight": (dim, dim),
            f"layers.{i}.attention.wk.weight": (kv_width, dim),
            f"layers.{i}.attention.wv.weight": (kv_width, dim),
            f"layers.{i}.attention.wo.weight": (dim, dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        }
    shapes["norm.weight"] = (dim,)
    if shape["with_output"]:
        shapes["output.weight"] = (vocab_size, dim)
    return shapes


def random_tensor(name: str, size: tuple, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Weights scaled like a trained model's, so activations stay in a realistic range."""
    if name.endswith("norm.weight"):  # near 1, but not exactly, so a skipped norm weight is noticed
        return (1 + 0.1 * torch.randn(size, generator=generator)).to(dtype)
    # Rows of dim values (the embedding too), so tied output logits have unit-sized spread.
    return (torch.randn(size, generator=generator) / size[-1] ** 0.5).to(dtype)


def write_params(folder: Path, shape: dict, vocab_size: int) -> None:
    params = {key: value for key, value in shape.items() if key != "with_output" and value is not None}
    params |= {"vocab_size": vocab_size, "norm_eps": 1e-05, "rope_theta": 500000.0}
    (folder / "params.json").write_text(json.dumps(params, sort_keys=True))


def write_checkpoint(
    folder: Path,
    shape: dict,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    real_tokenizer: Path = None,
) -> Path:
    """Write a random checkpoint folder; returns it. `real_tokenizer` copies that file in."""
    folder.mkdir(parents=True, exist_ok=True)
    if real_tokenizer is not None:
        shutil.copyfile(real_tokenizer, folder / "tokenizer.model")
    else:
        write_byte_level_tokenizer(folder / "tokenizer.model")
    n_base_tokens = sum(1 for line in (folder / "tokenizer.model").read_text().splitlines() if line.strip())
    vocab_size = n_base_tokens + N_SPECIAL_TOKENS
    write_params(folder, shape, vocab_size)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {
        name: random_tensor(name, size, generator, dtype) for name, size in meta_tensor_shapes(shape, vocab_size).items()
    }
    torch.save(state_dict, folder / "consolidated.00.pth")
    return folder


def memory_mapped_ranges(file_name: str) -> list[range]:
    """Address ranges where this process has mapped a file whose path ends with `file_name` (Linux).
    Written apart from the package's sharding.shard_mappings, so that the tests check it independently."""
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(file_name)):
            start, end = (int(address, 16) for address in line.split()[0].split("-"))
            ranges.append(range(start, end))
    return ranges


def mapped_file_rss_bytes(path: Path) -> int:
    """How much of the file at `path` this process holds in memory through mappings (Linux)."""
    total, in_file = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split()[0]:  # a mapping's header: "7fac3a600000-7facae607000 rw-p ... /path"
                in_file = line.rstrip().endswith(" " + str(path))
            elif in_file and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024  # "Rss:   2048 kB"
    return total


def folder_snapshot(folder: Path) -> dict:
    """{file name: (size, modification time)}: compare before and after to prove nothing changed.
    (Of a link, the link's own: it may point nowhere.)"""
    return {path.name: (path.lstat().st_size, path.lstat().st_mtime_ns) for path in sorted(folder.iterdir())}
