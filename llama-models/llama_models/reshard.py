"""Write a copy of a checkpoint split into N shards: `python -m llama_models.reshard SRC DST N`.

    python -m llama_models.reshard ~/.llama/checkpoints/Llama3.3-70B-Instruct ~/llama-70b-mp2 2

DST receives consolidated.00.pth ... in Meta's layout, where file r holds exactly the slices that
process r of N loads (see llama3/sharding.py), plus params.json and tokenizer.model. SRC is only read.

The loader already runs S shards on N processes when N divides S or S divides N, but then every
process cuts or glues its slices at each start: memory holds copies instead of pages of the mapped
file. With one file per process, loading copies nothing. N = 1 merges a checkpoint into one file.

Key/value heads are repeated when N exceeds them (as the loader does), and copies that an earlier
repetition made are dropped when N no longer needs them: 405B for 16 GPUs resharded to 8 gives
Meta's 8-GPU layout, and 1 -> 4 -> 2 -> 1 gives back the original files' tensors bit for bit.

Memory stays near one output shard: each output file is built from the memory-mapped inputs,
written, and released before the next.
"""

import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch imports: exit code 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch  # noqa: E402

from .llama3.args import LlamaError, ModelArgs, first_line, is_whole_number, model_arguments  # noqa: E402
from .llama3.checkpoint import find_checkpoint_files, whole_tensor_shapes  # noqa: E402
from .llama3.sharding import (  # noqa: E402
    KV_WEIGHTS,
    ShardFiles,
    args_for_model_parallel,
    check_world_size,
    local_state_dict,
    slice_for_rank,
    without_layer_prefix,
)
from .cli import OneLineParser, check_destination, new_folder, note_if_instruct_is_dropped, refuse_under_torchrun, run_tool  # noqa: E402


def reshard(src: Path, dst: Path, n_shards: int) -> None:
    """Write the checkpoint in folder `src` as `n_shards` shards into the new folder `dst`."""
    if not is_whole_number(n_shards) or n_shards < 1:
        raise LlamaError(f"N = {n_shards}: the number of shards must be a whole number of at least 1, "
                         "the number of processes that will run the copy")
    refuse_under_torchrun("reshard")
    files = find_checkpoint_files(src)
    dst = Path(dst).expanduser()
    check_destination(Path(src).expanduser(), dst)
    args = ModelArgs.from_json_file(files.params)
    if args.stored_scheme:
        raise LlamaError(f"{files.folder} is quantized ({args.stored_scheme}): torchrun loads it as it is, "
                         "with any process count that fits (each process cuts its slice from the one file)")
    check_world_size(args, len(files.shards), n_shards, files.folder)
    shards = ShardFiles(files.shards)
    whole_tensor_shapes(shards, args, files.folder)  # the source as the loader would check it

    loaded_args = args_for_model_parallel(args, n_shards)  # what the loader would build for N processes
    written_kv_heads = math.lcm(count_distinct_kv_heads(shards, args), n_shards)
    copies_to_drop = loaded_args.n_kv_heads // written_kv_heads
    del shards  # unmapped: the pages of wk and wv, read whole above, leave memory before the writing

    with new_folder(dst):
        for rank in range(n_shards):
            path = dst / f"consolidated.{rank:02d}.pth"
            partial = path.with_name(path.name + ".partial")  # what a kill beyond cleaning up leaves says so
            write_shard(files.shards, rank, n_shards, loaded_args, copies_to_drop, partial)
            os.replace(partial, path)
            print(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB)")
        shutil.copyfile(files.tokenizer, dst / "tokenizer.model")
        # Written last: a run killed beyond cleaning up (SIGKILL, a power cut) leaves a folder the
        # loader refuses as incomplete.
        write_params(files.params, dst / "params.json", args, written_kv_heads)
    print(f"wrote {dst / 'params.json'} and tokenizer.model")


# ------------------------------------------------------------------------------------------------
# Repeated key/value heads
# ------------------------------------------------------------------------------------------------


def count_distinct_kv_heads(shards: ShardFiles, args: ModelArgs) -> int:
    """n_kv_heads, or fewer when every head is stored several times in a row.

    An earlier repetition for more processes (405B for 16 GPUs, or this tool) stores exact copies,
    in every layer's wk and wv; two trained heads are never bit-for-bit equal. Reads wk and wv whole
    (a fifth of the attention weights in Llama 3 1B and 8B, a ninth in 70B), one at a time.
    """
    kv_names = [name for name in shards.tensor_names(0) if without_layer_prefix(name) in KV_WEIGHTS]
    if not kv_names:
        raise LlamaError(f"{shards.paths[0]} has no attention.wk weights: it is not a Llama checkpoint")
    for distinct in range(1, args.n_kv_heads):
        if args.n_kv_heads % distinct == 0 and all(
            heads_repeat(whole_kv_heads(shards, name, args), distinct) for name in kv_names
        ):
            return distinct
    return args.n_kv_heads


def whole_kv_heads(shards: ShardFiles, name: str, args: ModelArgs) -> torch.Tensor:
    """All heads of wk or wv, merged from every shard.   # (n_kv_heads, head_dim, dim)"""
    weight = slice_for_rank(shards, name, 0, rank=0, world_size=1)  # the one share of a single process
    if weight.shape[0] != args.n_kv_heads * args.head_dim:
        raise LlamaError(
            f"tensor {name!r} in {shards.paths[0].parent} has {weight.shape[0]} rows but params.json implies "
            f"{args.n_kv_heads * args.head_dim}: params.json and the weights come from different models"
        )
    return weight.unflatten(0, (args.n_kv_heads, args.head_dim))


def heads_repeat(heads: torch.Tensor, distinct: int) -> bool:
    """Are the heads `distinct` different ones, each repeated in a run of equal copies?"""
    runs = heads.unflatten(0, (distinct, -1))  # (distinct, copies, head_dim, dim)
    return torch.equal(runs, runs[:, :1].expand_as(runs))


def drop_repeated_kv_heads(tensors: dict, copies: int, head_dim: int) -> dict:
    """Keep the first head of every run of `copies` equal heads in wk and wv."""
    if copies == 1:
        return tensors
    thinned = dict(tensors)
    for name, weight in tensors.items():
        if without_layer_prefix(name) in KV_WEIGHTS:
            runs = weight.unflatten(0, (-1, copies, head_dim))  # (heads kept, copies, head_dim, dim)
            thinned[name] = runs[:, 0].flatten(0, 1)
    return thinned


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def write_shard(shard_paths: list, rank: int, n_shards: int, loaded_args: ModelArgs, copies_to_drop: int, path: Path):
    """Write what process `rank` of `n_shards` loads, in Meta's format, each tensor at its own size.

    torch.save writes a tensor's whole storage, so a slice that is a view into a larger tensor would
    drag all of it into the file: such slices are copied out first. The rest are written straight
    from the memory-mapped source. Everything is released on return, before the next shard.
    """
    tensors = local_state_dict(shard_paths, rank, n_shards, loaded_args)
    tensors = drop_repeated_kv_heads(tensors, copies_to_drop, loaded_args.head_dim)
    compact = {}
    for name, tensor in tensors.items():
        owns_its_storage = tensor.untyped_storage().nbytes() == tensor.nbytes
        compact[name] = tensor if owns_its_storage else tensor.clone()
    torch.save(compact, path)


def write_params(source: Path, destination: Path, args: ModelArgs, n_kv_heads: int) -> None:
    """Copy params.json, with n_kv_heads changed when the written heads are repeated (or no longer)."""
    if n_kv_heads == args.n_kv_heads:
        shutil.copyfile(source, destination)
        return
    params = json.loads(source.read_text())
    arguments = model_arguments(params)
    arguments["n_kv_heads"] = n_kv_heads
    destination.write_text(json.dumps(params))


def main(argv: list = None) -> int:
    parser = OneLineParser(
        prog="python -m llama_models.reshard",
        description="Write a copy of a Llama 3.x checkpoint folder split into N shards, for N processes.",
    )
    parser.add_argument("src", type=Path, help="checkpoint folder to read (never changed)")
    parser.add_argument("dst", type=Path, help="folder to create (it must not exist, or be empty)")
    parser.add_argument("n", type=int, help="number of shards to write: the process count that will run it")
    options = parser.parse_args(argv)
    try:
        reshard(options.src, options.dst, options.n)
    except LlamaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:  # a folder we may not write to; a full disk (torch.save's RuntimeError)
        reason = first_line(error)
        print(f"error: writing {options.dst} failed ({reason}): free some space or choose another folder, "
              "and run again (nothing was left there)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted: nothing was left in {options.dst}", file=sys.stderr)
        return 130
    note_if_instruct_is_dropped(options.src, options.dst, f"mp{options.n}")
    return 0


if __name__ == "__main__":
    run_tool(main)
