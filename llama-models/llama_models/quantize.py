"""Write a quantized copy of a checkpoint: `python -m llama_models.quantize SRC DST int8|int4`.

    python -m llama_models.quantize ~/.llama/checkpoints/Llama3.1-8B-Instruct ~/llama-8b-int4 int4

DST receives consolidated.00.pth with every matrix in 8 or 4 bits (the layout is described in
llama3/quantize.py), params.json naming the scheme, and tokenizer.model. SRC is only read. Loading
DST memory-maps the file and uses the numbers where they lie, so nothing is quantized at each start;
both scripts and load_llama take the folder as it is, and torchrun splits it across processes like
any checkpoint (the loader cuts each process's slices out of the one file).

Memory stays near one matrix: the file's layout is written first with room for every tensor, then
the file is memory-mapped for writing and each matrix is quantized straight into its place. A
checkpoint in several shards (70B) is glued back together one matrix at a time, so each int8 scale
covers a whole row and each int4 group its whole columns, as with one process.
"""

import json
import mmap
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

if __name__ == "__main__":  # Ctrl-C while torch imports: exit code 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch  # noqa: E402

from .llama3.args import LlamaError, ModelArgs, first_line, model_arguments  # noqa: E402
from .llama3.checkpoint import find_checkpoint_files, whole_tensor_shapes  # noqa: E402
from .llama3.quantize import GROUP_SIZE, STORED_SCHEMES, check_scheme, empty_quantized, listed, quantized  # noqa: E402
from .llama3.sharding import ShardFiles, release_mapped_pages, same_memory, slice_for_rank, split_dim, without_layer_prefix  # noqa: E402
from .cli import OneLineParser, check_destination, new_folder, note_if_instruct_is_dropped, refuse_under_torchrun, run_tool  # noqa: E402

WEIGHTS_FILE = "consolidated.00.pth"


def quantize_checkpoint(src: Path, dst: Path, scheme: str, group_size: int = GROUP_SIZE,
                        progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Write the checkpoint in folder `src`, quantized to `scheme`, into the new folder `dst`.
    `progress(done, total)` is called after each tensor."""
    if scheme == "fp16":
        raise LlamaError("fp16 is packed for fbgemm at every load and cannot be stored (fbgemm saves a packed matrix "
                         "by unpacking it): use QUANTIZE = 'fp16' (load_llama(..., quantize='fp16')) on the bfloat16 folder")
    if scheme not in STORED_SCHEMES:
        raise LlamaError(f"unknown scheme {scheme!r}: use {listed(STORED_SCHEMES)}")
    refuse_under_torchrun("quantize")
    files = find_checkpoint_files(src)
    dst = Path(dst).expanduser()
    check_destination(Path(src).expanduser(), dst)
    args = ModelArgs.from_json_file(files.params)
    if args.stored_scheme:
        raise LlamaError(f"{files.folder} is already quantized ({args.stored_scheme}, by this tool): "
                         "quantize the bfloat16 checkpoint it came from")
    shards = ShardFiles(files.shards)
    shapes = whole_tensor_shapes(shards, args, files.folder)
    if "output.weight" in shapes and output_is_the_embedding(shards):  # a tied output layer is written once
        del shapes["output.weight"]
    names = list(shapes)
    matrices = [name for name in names if split_dim(without_layer_prefix(name)) is not None]
    check_scheme(scheme, [shapes[name][1] for name in matrices], group_size, [shapes[name][0] for name in matrices])
    layout = quantized_layout(shards, shapes, matrices, scheme, group_size)

    with new_folder(dst):  # an error, a full disk, Ctrl-C or a kill: no half-written folder is left
        partial = dst / (WEIGHTS_FILE + ".partial")
        write_in_place(partial, layout, lambda mapped: quantize_into(shards, names, matrices, scheme, group_size,
                                                                     mapped, [partial], progress))
        os.replace(partial, dst / WEIGHTS_FILE)
        shutil.copyfile(files.tokenizer, dst / "tokenizer.model")
        # Written last: a run killed beyond cleaning up (SIGKILL, a power cut) leaves a folder the
        # loader refuses as incomplete.
        write_params(files.params, dst / "params.json", scheme, group_size)


# ------------------------------------------------------------------------------------------------
# What the new file holds
# ------------------------------------------------------------------------------------------------


def output_is_the_embedding(shards: ShardFiles) -> bool:
    """Is output.weight stored as the embedding's own numbers (one tensor saved under two names)?"""
    return len(shards) == 1 and same_memory(shards.tensor(0, "output.weight")) == same_memory(
        shards.tensor(0, "tok_embeddings.weight"))


def quantized_layout(shards: ShardFiles, shapes: dict, matrices: list, scheme: str, group_size: int) -> dict:
    """{name: (shape, dtype)} of every tensor the new file holds, from {name: whole shape}: each
    matrix as its quantized parts ("wq.weight.values", ...), the norms as they are."""
    layout = {}
    for name, shape in shapes.items():
        dtype = shards.tensor(0, name).dtype
        if name in matrices:
            empty = empty_quantized(*shape, dtype, scheme, group_size, looked_up=False)
            layout |= {f"{name}.{part}": (tuple(tensor.shape), tensor.dtype) for part, tensor in empty.state_dict().items()}
        else:
            layout[name] = (shape, dtype)
    return layout


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def write_in_place(path: Path, layout: dict, fill: Callable[[dict], None]) -> None:
    """torch.save a {name: tensor} dict of this {name: (shape, dtype)} layout without holding it in
    memory: first the file's structure with room where each tensor's bytes go (skip_data, from fake
    tensors that own no memory), then `fill(mapped)` writes into the tensors of the file memory-mapped
    with MAP_SHARED, so that writes land in the file. The result is an ordinary torch.save file."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        skeleton = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, path)
    reserve_disk_space(path)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(path, mmap=True, weights_only=True)
    fill(mapped)
    del mapped
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def reserve_disk_space(path: Path) -> None:
    """The skeleton's room is a hole: a write through the mapping to a full disk would kill the
    process (SIGBUS), so the room is claimed now, where a full disk raises OSError. macOS has no
    posix_fallocate: there the free space is checked instead."""
    size = os.path.getsize(path)
    if hasattr(os, "posix_fallocate"):
        with open(path, "rb+") as file:
            os.posix_fallocate(file.fileno(), 0, size)
    elif shutil.disk_usage(path.parent).free < size:
        raise OSError(f"{size / 2**30:.1f} GiB do not fit in the free space of {path.parent}")


def quantize_into(shards: ShardFiles, names: list, matrices: list, scheme: str, group_size: int, mapped: dict,
                  written: list, progress) -> None:
    """Quantize each matrix of `shards` (copy each other tensor) into its place in `mapped`, one at a
    time, giving back the pages of the source and of the written file (`written`) as it goes."""
    for count, name in enumerate(names, start=1):
        dim = split_dim(without_layer_prefix(name))
        whole = slice_for_rank(shards, name, dim, rank=0, world_size=1) if dim is not None else shards.tensor(0, name)
        if name in matrices:
            parts = quantized(whole, scheme, group_size, looked_up=False).state_dict()
            parts = {f"{name}.{part}": tensor for part, tensor in parts.items()}
        else:
            parts = {name: whole}
        for part, tensor in parts.items():
            # A NaN or infinite weight makes its row's (int4: its group's) scale NaN or infinite too.
            if tensor.is_floating_point() and not tensor.isfinite().all():
                raise LlamaError(f"{name} holds NaN or infinite numbers: the checkpoint is damaged; download it again")
            mapped[part].copy_(tensor)
            release_mapped_pages(mapped[part], written)  # on disk or on its way: the page cache holds it
        shards.release(whole)
        del whole, parts
        if progress:
            progress(count, len(names))


def write_params(source: Path, destination: Path, scheme: str, group_size: int) -> None:
    params = json.loads(source.read_text())
    arguments = model_arguments(params)
    arguments["quantization"] = {"scheme": scheme, "group_size": group_size} if scheme == "int4" else {"scheme": scheme}
    destination.write_text(json.dumps(params))


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def main(argv: list = None) -> int:
    parser = OneLineParser(
        prog="python -m llama_models.quantize",
        description="Write a copy of a Llama 3.x checkpoint folder with its matrices in 8 or 4 bits.",
    )
    parser.add_argument("src", type=Path, help="checkpoint folder to read (never changed)")
    parser.add_argument("dst", type=Path, help="folder to create (it must not exist, or be empty)")
    parser.add_argument("scheme", help="int8 (a scale per row) or int4 (a scale and zero per group of inputs)")
    parser.add_argument("--group-size", type=int, help=f"int4: inputs per group (default {GROUP_SIZE})")
    options = parser.parse_args(argv)
    started, shown = time.perf_counter(), []

    def show(done: int, total: int) -> None:  # a line that counts up on a terminal; only its end in a file
        if done == total or sys.stdout.isatty():
            print(f"\rquantizing to {options.scheme}: {done}/{total} tensors, {time.perf_counter() - started:.1f} s",
                  end="\n" if done == total else "", flush=True)
            shown[:] = [done < total]  # a line without its end yet

    def fail(message: str) -> None:
        print(("\n" if any(shown) else "") + f"error: {message}", file=sys.stderr)

    try:
        if options.group_size is not None and options.scheme == "int8":
            raise LlamaError(f"--group-size is for int4, not {options.scheme}: leave it out")
        group_size = GROUP_SIZE if options.group_size is None else options.group_size
        quantize_checkpoint(options.src, options.dst, options.scheme, group_size, progress=show)
    except LlamaError as error:
        fail(str(error))
        return 2
    except (OSError, RuntimeError, MemoryError) as error:  # a folder we may not write to, a full disk, no memory
        reason = first_line(error)
        fail(f"quantizing into {options.dst} failed ({reason}); nothing was left there: check that the folder can "
             "be created there, free some disk space or memory, and run again")
        return 2
    except KeyboardInterrupt:
        fail(f"interrupted: nothing was left in {options.dst}")
        return 130
    size = (options.dst.expanduser() / WEIGHTS_FILE).stat().st_size
    print(f"wrote {options.dst / WEIGHTS_FILE} ({size / 2**20:,.1f} MiB), params.json and tokenizer.model")
    note_if_instruct_is_dropped(options.src, options.dst, options.scheme)
    return 0


if __name__ == "__main__":
    run_tool(main)  # Ctrl-C, kill and a closed terminal: what was written is removed
