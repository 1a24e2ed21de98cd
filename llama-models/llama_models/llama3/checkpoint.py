"""From a downloaded checkpoint folder to a ready model: `load_llama(ckpt_dir, device=..., dtype=...)`.

A Meta checkpoint folder (e.g. ~/.llama/checkpoints/Llama3.2-1B-Instruct) holds:

    params.json          the model's shape (see args.py)
    tokenizer.model      the BPE vocabulary (see tokenizer.py)
    consolidated.00.pth  the weights: a torch.save'd dict name -> bfloat16 tensor; 70B has 8 of them
                         (00 .. 07), each holding 1/8 of every matrix (see sharding.py)

Loading keeps memory near one copy of the weights: the .pth files are memory-mapped (pages come from
disk when first read), the model is built without weights of its own, and `load_state_dict(...,
assign=True)` makes the mapped tensors the model's parameters instead of copying into them. Where a
copy cannot be avoided (float32, a GPU, several shards glued together), each tensor's pages of the
file are given back as soon as it is copied (Linux; see sharding.py).

Under torchrun, each of the N processes loads only its 1/N of every matrix (model parallelism); N
need not equal the number of shard files (see sharding.py).

The steps are small public functions so the scripts can show them one by one; `load_llama` runs them
in order. Nothing here writes to the checkpoint folder.
"""

import atexit
import contextlib
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fairscale_parallel

from .args import LlamaError, ModelArgs
from .model import Transformer
from .quantize import pack_for_cpu, quantize as quantize_weights
from .sharding import (QUANTIZED_PART_SPLIT, ShardFiles, args_for_model_parallel, check_world_size, first_shard_of,
                       local_state_dict, release_mapped_pages, same_memory)
from .tokenizer import Tokenizer

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")
QUANTIZED_PART_NAMES = tuple(f".{part}" for part in QUANTIZED_PART_SPLIT)  # of a quantize tool's matrices
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------------
# Device and dtype
# ------------------------------------------------------------------------------------------------


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    """"auto" -> cuda, else mps, else cpu. Any other name must be available here."""
    if not isinstance(name, (str, torch.device)):  # torch.device(1) would mean cuda:1
        raise LlamaError(f"unknown device {name!r}: use one of {', '.join(DEVICE_NAMES)} in quotes (or 'cuda:N')")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LlamaError(f"unknown device {name!r}: use one of {', '.join(DEVICE_NAMES)} (or cuda:N)") from None
    if device.type not in DEVICE_NAMES:
        raise LlamaError(f"device {name!r} is not supported: use one of {', '.join(DEVICE_NAMES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlamaError(f"device {name!r} is not available: this torch build or machine has no CUDA; use 'cpu' or 'auto'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LlamaError(f"device {name!r} is not available: MPS needs an Apple-silicon Mac; use 'cpu' or 'auto'")
    return device


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """The weights' dtype: as asked, or (None) bfloat16 where the device supports it.

    Decoding reads every weight once per token: bfloat16 (the checkpoint's own dtype, 2 bytes) has
    half float32's bytes to read, so it can decode up to twice as fast where memory sets the pace
    (where the CPU converts each bfloat16 weight as it multiplies, less), and it needs half the
    memory (8B: 16 GB instead of 32 GB). It also loads with no conversion (README, "Speed and memory,
    measured", has both dtypes' figures). GPUs without bfloat16 (before NVIDIA Ampere, Macs before
    macOS 14) get float16.
    """
    if dtype is None:
        return torch.bfloat16 if _supports_bfloat16(device) else torch.float16
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2:  # float8 holds no weights
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:  # torch.int8 too: weights are floating-point numbers
        raise LlamaError(f"unknown dtype {dtype!r}: use None or one of {', '.join(repr(name) for name in DTYPES)}")
    return DTYPES[dtype]


def _supports_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":  # before Ampere, bfloat16 is emulated: float16 is the GPU's own half precision
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):  # "MPS BFloat16 is only supported on MacOS 14 or newer"
            return False
    return True


# ------------------------------------------------------------------------------------------------
# torch.distributed and fairscale
# ------------------------------------------------------------------------------------------------


def init_model_parallel(device: torch.device) -> torch.device:
    """Start torch.distributed and fairscale's model parallelism, unless someone already has.

    fairscale's layers ask "which process am I, and how many share the model?" even when the answer
    is "one of one", so a process group must exist. `torchrun` sets RANK, WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT and we join its group; a plain `python script.py` gets a group of one, whose
    rendezvous is an in-memory store (no network port). NCCL talks between CUDA GPUs; gloo works
    everywhere else.

    Returns the device this process computes on: "cuda" becomes the GPU numbered by torchrun's
    LOCAL_RANK, so that the processes on one machine use one GPU each.
    """
    check_torchrun_environment()
    device = _device_for_this_process(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL communicates from the current GPU
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(end_model_parallel)  # we opened it, so we close it, even if the caller does not
    if not fairscale_parallel.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints three banner lines
            fairscale_parallel.initialize_model_parallel(dist.get_world_size())
    return device


def check_torchrun_environment() -> None:
    """torchrun's variables, where one is set: RANK, WORLD_SIZE and LOCAL_RANK are process numbers,
    and RANK comes with the rest of what torch.distributed reads."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        value = os.environ.get(name, "0")
        if not (value.isascii() and value.isdigit()):
            raise LlamaError(f"the environment variable {name}={value!r} is not a process number: torchrun sets "
                             "it; unset it to run one process (or start the script with torchrun)")
    missing = [name for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if "RANK" in os.environ and missing:
        raise LlamaError(f"the environment variable RANK is set but not {' and '.join(missing)}: torchrun sets them "
                         "all; unset RANK to run one process (or start the script with torchrun)")


def _device_for_this_process(device: torch.device) -> torch.device:
    """Under torchrun, "cuda" means the GPU numbered by this process's LOCAL_RANK."""
    n_processes = int(os.environ.get("WORLD_SIZE", 1))
    if n_processes > 1 and device.type == "mps":
        raise LlamaError("several processes cannot share an MPS device (gloo cannot send MPS tensors): use 'cpu'")
    if device.type != "cuda":
        return device
    if device.index is not None and n_processes > 1:
        raise LlamaError(f"device {str(device)!r} would put every process on one GPU: under torchrun use 'cuda'")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.index is None and local_rank >= torch.cuda.device_count():
        raise LlamaError(
            f"process {local_rank} on this machine needs GPU {local_rank}, but there are "
            f"{torch.cuda.device_count()}: start at most that many processes per machine"
        )
    return device if device.index is not None else torch.device("cuda", local_rank)


def end_model_parallel() -> None:
    """Close torch.distributed at the end of a run, in every process.

    A process that exits with its group still open can abort ("terminate called without an active
    exception") while the other processes are closing their connections to it, and torchrun then
    reports the run as failed: 7 of 12 two-process gloo runs did so in one trial (a 2-core AMD
    EPYC), none after this call.
    `init_model_parallel` registers this to run at exit when it opened the group, so a program need
    not call it; calling it earlier frees the group sooner, and a second call does nothing.
    Models built before cannot run afterwards: fairscale's layers look up the group at every call.
    """
    if fairscale_parallel.model_parallel_is_initialized():
        fairscale_parallel.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def model_parallel_rank_and_size() -> tuple[int, int]:
    return fairscale_parallel.get_model_parallel_rank(), fairscale_parallel.get_model_parallel_world_size()


def is_main_process() -> bool:
    """True in the one process that should print: rank 0 under torchrun, or a process on its own."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def every_process_or_none(what: str):
    """Run a step that only some processes may fail (each reads its own shard), and then let every
    process know whether all succeeded: where one fails, the others stop with one line naming
    `what`, instead of a traceback about a closed connection at their next collective operation."""
    try:
        yield
    except Exception:
        with contextlib.suppress(RuntimeError):  # the others may be gone: this process's own error is what matters
            _all_processes_succeeded(False)
        raise
    if not _all_processes_succeeded(True):
        raise LlamaError(f"another process could not {what} (its own line says why)")


def _all_processes_succeeded(succeeded: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return succeeded
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(succeeded)], device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Overwrite `tokens` in every process with rank 0's values, and return it.

    All processes must feed the model the same tokens, or their slices stop fitting together. The
    output layer gathers the same logits, bit for bit, in every process, so greedy decoding picks
    the same token everywhere, and so does sampling with a generator seeded alike in every process:
    run_inference.py needs no broadcast. This is for code of your own that chooses tokens another
    way (a random seed per process, input read by one process). With NCCL, `tokens` must be on the
    process's GPU.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tokens, src=0)
    return tokens


# ------------------------------------------------------------------------------------------------
# The checkpoint folder
# ------------------------------------------------------------------------------------------------


@dataclass
class CheckpointFiles:
    params: Path
    tokenizer: Path
    shards: list  # consolidated.00.pth, consolidated.01.pth, ... in order

    @property
    def folder(self) -> Path:
        return self.params.parent

    @property
    def model_name(self) -> str:
        """The folder's name ("Llama3.2-1B-Instruct"), or for Hugging Face's layout its parent's."""
        return self.folder.parent.name if self.folder.name == HF_SUBFOLDER else self.folder.name

    @property
    def named_instruct(self) -> bool:
        """Whether the name says it is an instruct model, which the scripts prompt in the chat format."""
        return "instruct" in self.model_name.lower()


# Hugging Face's copy of a Meta checkpoint keeps Meta's files in a subfolder:
# hf download meta-llama/Llama-3.2-1B-Instruct --include "original/*" --local-dir Llama-3.2-1B-Instruct
# gives Llama-3.2-1B-Instruct/original/{params.json, tokenizer.model, consolidated.00.pth}.
HF_SUBFOLDER = "original"


def find_checkpoint_files(ckpt_dir: Union[str, Path]) -> CheckpointFiles:
    """Check that the folder (or its original/ subfolder) holds params.json, tokenizer.model and the
    .pth shards."""
    if not isinstance(ckpt_dir, (str, os.PathLike)):
        raise LlamaError(f"the checkpoint folder is {ckpt_dir!r}: give its path, a str or a Path")
    folder = Path(ckpt_dir).expanduser()
    if folder.is_file():
        raise LlamaError(f"{folder} is a file: give the checkpoint folder that holds it ({folder.parent})")
    if not folder.is_dir():
        raise LlamaError(
            f"checkpoint folder {folder} not found: give a folder holding params.json, tokenizer.model and "
            "consolidated.00.pth (Meta's downloader makes one per model under ~/.llama/checkpoints)"
        )
    if not (folder / "params.json").exists() and (folder / HF_SUBFOLDER / "params.json").is_file():
        folder = folder / HF_SUBFOLDER
    params, tokenizer = folder / "params.json", folder / "tokenizer.model"
    for required in (params, tokenizer):
        if not required.is_file():
            if any(folder.glob("*.pth.partial")):  # params.json and tokenizer.model come last
                raise LlamaError(f"{folder} holds an unfinished copy from llama_models.quantize or reshard (a run "
                                 "that was killed): delete the folder and run the tool again")
            if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
                raise LlamaError(f"{folder} holds transformers' copy of the weights, not Meta's files: download those "
                                 "too (hf download <model> --include 'original/*' --local-dir <folder>)")
            inside = checkpoint_folders_inside(folder)
            if inside:  # ~/.llama/checkpoints itself, say
                raise LlamaError(f"{folder} holds checkpoint folders ({', '.join(inside)}), not one checkpoint: give "
                                 "the path of one of them")
            raise LlamaError(f"{required} not found: the checkpoint folder is incomplete; download the model again")
    shards = sorted(folder.glob("*.pth"))
    if not shards:
        raise LlamaError(f"no consolidated.*.pth weights in {folder}: the download is incomplete; download the model again")
    return CheckpointFiles(params, tokenizer, shards_in_order(shards, folder))


def shards_in_order(shards: list, folder: Path) -> list:
    """consolidated.00.pth ... consolidated.<N-1>.pth, ordered by number (by name, .100 would come
    before .11): any other .pth file would be read as a shard, and a gap means one is missing."""
    numbered = {}
    for shard in shards:
        found = re.fullmatch(r"consolidated\.(\d+)\.pth", shard.name)
        if not found:
            raise LlamaError(f"{shard} is not a shard's name (Meta's are consolidated.00.pth, consolidated.01.pth, "
                             "...), yet every .pth file would be read as one: move it out of the folder")
        numbered[int(found.group(1))] = shard
    missing = [index for index in range(len(shards)) if index not in numbered]
    if missing:
        raise LlamaError(f"{folder} has {len(shards)} shards but no consolidated.{missing[0]:02d}.pth: the download "
                         "is incomplete; download the model again")
    return [numbered[index] for index in range(len(shards))]


def checkpoint_folders_inside(folder: Path, most: int = 4) -> list:
    """The names of up to `most` folders in `folder` that hold a params.json, and "..." if more do."""
    names = sorted(sub.name for sub in folder.iterdir() if (sub / "params.json").is_file()
                   or (sub / HF_SUBFOLDER / "params.json").is_file())
    return names[:most] + (["..."] if len(names) > most else [])


def load_tokenizer(path: Path, args: ModelArgs) -> Tokenizer:
    try:
        tokenizer = Tokenizer(path)
    except ValueError as error:
        raise LlamaError(f"{error}: the tokenizer file is damaged; download tokenizer.model again") from None
    if tokenizer.n_words != args.vocab_size:
        raise LlamaError(
            f"params.json says vocab_size={args.vocab_size} but {path} has {tokenizer.n_words} tokens: "
            "they come from different models; use the tokenizer.model that came with these weights"
        )
    return tokenizer


# ------------------------------------------------------------------------------------------------
# Building the model and loading the weights
# ------------------------------------------------------------------------------------------------


def build_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """This process's share of the Transformer: its KV cache on `device` in `dtype`, no weights yet.

    With more processes than key/value heads, each process gets a (repeated) head of its own, so the
    model is built with n_kv_heads raised to the process count (see sharding.py).
    """
    _, world_size = model_parallel_rank_and_size()
    args = args_for_model_parallel(args, world_size)
    kv_cache = kv_cache_bytes(args, world_size, dtype)
    too_large = LlamaError(f"the {device.type} memory cannot hold the KV cache of {args.max_batch_size} sequence(s) "
                           f"of {args.max_seq_len} positions ({kv_cache / 2**30:,.1f} GiB): ask for fewer (max_seq_len, "
                           "max_batch_size; in run_inference.py MAX_NEW_TOKENS, BEAM_WIDTH, CHAT_CONTEXT)")
    # On the CPU the cache is zeroed page by page, layer by layer: far beyond the memory, the system
    # would kill the process before an allocation failed.
    if device.type == "cpu" and kv_cache > physical_memory_bytes():
        raise too_large
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Transformer(args)
    except RuntimeError as error:  # torch.OutOfMemoryError (CUDA) is one; MPS raises a plain RuntimeError
        if not (isinstance(error, torch.OutOfMemoryError)
                or re.search(r"can't allocate memory|out of memory|Invalid buffer size", str(error))):
            raise
        raise too_large from None
    finally:
        torch.set_default_dtype(previous_dtype)


def physical_memory_bytes() -> float:
    """The machine's memory, or infinity where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # Windows has no sysconf
        return math.inf


def kv_cache_bytes(args: ModelArgs, world_size: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer, sequence, position and key/value head of one of `world_size`
    processes (args as args_for_model_parallel gives them: at least a head per process)."""
    return (2 * args.n_layers * args.max_batch_size * args.max_seq_len * (args.n_kv_heads // world_size)
            * args.head_dim * dtype.itemsize)


MISMATCH_HELP = "params.json and the weights come from different models; download them together"
QUANTIZED_HELP = ('it was written by llama_models.quantize, and params.json\'s "quantization" must say how: '
                  "restore the params.json it wrote, or quantize the bfloat16 checkpoint again")


def match_checkpoint_to_model(state_dict: dict, model: Transformer, path: Path) -> dict:
    """Return the tensors the model expects, by name, after checking every name and shape.

    Quietly fixed: a leftover `rope.freqs` tensor (Llama 2 era files) is dropped, since the model
    computes its own rotation table; Llama 3.2 1B/3B files without `output.weight` reuse the embedding
    matrix (the two are tied: the same matrix reads tokens in and scores them out; in a quantized
    folder, `output.weight.values` ... are then the embedding's).
    """
    tensors = {name: t for name, t in state_dict.items() if isinstance(t, torch.Tensor) and name != "rope.freqs"}
    tie_output_to_embedding(tensors)
    expected = model.state_dict()
    check_quantization_is_announced(tensors, expected, model.args, path)
    for name, wanted in expected.items():
        if name not in tensors:
            raise LlamaError(f"{path} has no tensor {name!r} that params.json implies: {MISMATCH_HELP}")
        check_tensor(name, tensors[name], wanted, path)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise LlamaError(
            f"{path} has tensor {unexpected[0]!r} that this model does not use ({len(unexpected)} such): "
            f"Meta's quantized or vision checkpoints are not supported, otherwise {MISMATCH_HELP}"
        )
    return tensors


def whole_tensor_shapes(shards: ShardFiles, args: ModelArgs, folder: Path) -> dict:
    """{name: shape in one piece} of a checkpoint's tensors, checked against params.json as loading
    checks them (one line naming any tensor that does not fit): for the tools, which read a whole
    checkpoint in one process."""
    init_model_parallel(torch.device("cpu"))  # a group of one process: the model is built whole
    model = build_model(args, torch.device("meta"), torch.bfloat16)  # shapes only
    shapes = {name: shards.whole_shape(name) for name in shards.tensor_names(0)}
    stand_ins = {name: torch.empty(shape, dtype=shards.tensor(0, name).dtype, device="meta")
                 for name, shape in shapes.items()}
    match_checkpoint_to_model(stand_ins, model, folder)
    shapes.pop("rope.freqs", None)
    return shapes


def tie_output_to_embedding(tensors: dict) -> None:
    """Without an output layer (Llama 3.2 1B and 3B), the embedding's tensors serve as it, in place."""
    if not any(name.startswith("output.weight") for name in tensors):
        for name in [name for name in tensors if name.startswith("tok_embeddings.weight")]:
            tensors[name.replace("tok_embeddings", "output", 1)] = tensors[name]


def check_quantization_is_announced(tensors: dict, expected: dict, args, path: Path) -> None:
    """A quantize tool's folder whose params.json lost (or changed) its "quantization" would
    otherwise be blamed on the tensors' names."""
    quantized_parts = [name for name in tensors if name.endswith(QUANTIZED_PART_NAMES)]
    if quantized_parts and not any(name.endswith(quantized_parts[0].rsplit(".", 1)[1]) for name in expected):
        scheme = args.stored_scheme
        said = f"params.json's scheme, {scheme}, does not describe" if scheme else "params.json does not announce"
        raise LlamaError(f"{path} holds quantized matrices ({quantized_parts[0]}) that {said}: {QUANTIZED_HELP}")


def check_tensor(name: str, stored: torch.Tensor, wanted: torch.Tensor, path: Path) -> None:
    """The file's tensor has the shape the model's has, and numbers of its kind."""
    shape, is_quantized_part = tuple(wanted.shape), name.endswith(QUANTIZED_PART_NAMES)
    if tuple(stored.shape) != shape:
        implies = "params.json's \"quantization\" implies" if is_quantized_part else "params.json implies"
        raise LlamaError(f"tensor {name!r} in {path} has shape {tuple(stored.shape)}, not the {shape} that "
                         f"{implies}{missing_shards_hint(tuple(stored.shape), shape)}: "
                         f"{QUANTIZED_HELP if is_quantized_part else MISMATCH_HELP}")
    if not holds_numbers_of_the_kind(stored.dtype, wanted.dtype):
        fix = QUANTIZED_HELP if is_quantized_part else "download the checkpoint again"
        taken = "floating-point ones" if wanted.dtype.is_floating_point else wanted.dtype
        raise LlamaError(f"tensor {name!r} in {path} holds {stored.dtype} numbers where the model takes "
                         f"{taken}: the file is damaged or was not written for Llama; {fix}")


def missing_shards_hint(stored: tuple, wanted: tuple) -> str:
    """Where one size is a whole fraction of the wanted one, the shards that hold the rest may be missing."""
    differing = [(have, want) for have, want in zip(stored, wanted) if have != want]
    if len(stored) != len(wanted) or len(differing) != 1 or differing[0][1] % differing[0][0]:
        return ""
    parts = differing[0][1] // differing[0][0]
    return f" (1/{parts} of it: if the checkpoint has {parts} shards, some are missing from the folder)"


def holds_numbers_of_the_kind(stored: torch.dtype, taken: torch.dtype) -> bool:
    """Floating-point weights of any precision (they are converted on loading); quantized codes
    exactly as the model stores them (int8 values, uint8 int4 codes)."""
    return stored.is_floating_point if taken.is_floating_point else stored == taken


def load_weights(model: Transformer, files: CheckpointFiles, device: torch.device, dtype: torch.dtype) -> None:
    """Make this process's slices of the checkpoint's tensors the model's parameters.

    One process reads every shard (merging them if there are several); under torchrun, process r of
    N reads only its own slices (see sharding.py). Tensors are converted only where needed.
    """
    rank, world_size = model_parallel_rank_and_size()
    # Named in error messages: the one file this process reads (its shard), else the folder.
    reads_one_shard = world_size >= len(files.shards)
    weights = files.shards[first_shard_of(rank, len(files.shards), world_size)] if reads_one_shard else files.folder
    with every_process_or_none("read its part of the weights"):  # the shards a machine has may differ
        check_world_size(model.args, len(files.shards), world_size, files.folder)
        state_dict = local_state_dict(files.shards, rank, world_size, model.args)
        tensors = match_checkpoint_to_model(state_dict, model, weights)
    # From here on `tensors` holds the only reference to each tensor read, so a tensor glued from
    # several shards (a copy in ordinary memory) is freed as soon as its converted copy replaces it.
    del state_dict
    convert_one_by_one(tensors, device, dtype, files.shards)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.requires_grad_(False)  # inference only: autograd needs no bookkeeping for these


def convert_one_by_one(tensors: dict, device: torch.device, dtype: torch.dtype, shard_paths: list) -> None:
    """Replace every tensor in {name: tensor} by itself on `device` in `dtype`, holding at most one
    tensor twice at any moment.

    On the CPU in the file's dtype, `.to` returns the memory-mapped tensor itself: no copy at all.
    Any other dtype or device makes a copy; then the tensor's pages of the mapped file are given back
    (see sharding.py), and a tensor in ordinary memory (glued from several shards) is freed when its
    copy replaces it in `tensors`. The largest tensors go first, while few copies exist yet.
    Tied matrices (Meta's 3.2 1B/3B files store output.weight as the embedding's storage) are
    converted once, so they stay one tensor on the device too.
    """
    converted = {}  # same_memory(tensor) -> its copy
    for name in sorted(tensors, key=lambda name: tensors[name].numel(), reverse=True):
        tensor = tensors[name]
        key = same_memory(tensor)
        if key not in converted:  # quantized codes are integers: they only move
            converted[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            if converted[key] is not tensor:
                release_mapped_pages(tensor, shard_paths)
        tensors[name] = converted[key]


def load_llama(
    ckpt_dir: Union[str, Path],
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[None, str, torch.dtype] = None,
    max_seq_len: int = ModelArgs.max_seq_len,
    max_batch_size: int = ModelArgs.max_batch_size,
    quantize: Optional[str] = None,
) -> tuple[Transformer, Tokenizer]:
    """Load a Meta Llama 3.x checkpoint folder; return (model, tokenizer) ready for `model(tokens, pos)`.

    max_seq_len and max_batch_size size the KV cache: choose what you need, not more (the cache
    of 8B at batch 1 takes 128 KiB per token in bfloat16). quantize: None, "int8" or "int4"
    stores the matrices in 8 or 4 bits (quantize.py), quantized one by one as they are loaded;
    "fp16" packs them for fbgemm's half-precision product instead (the CPU only). A
    folder written by `python -m llama_models.quantize` is quantized already: it loads as it is,
    with quantize=None or its own scheme.
    """
    files = find_checkpoint_files(ckpt_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    args = ModelArgs.from_json_file(files.params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    check_quantize_request(quantize, args, files.folder)
    tokenizer = load_tokenizer(files.tokenizer, args)
    device = init_model_parallel(device)
    model = build_model(args, device, dtype)
    load_weights(model, files, device, dtype)
    quantize_loaded(model, quantize, args, files.shards)
    return model, tokenizer


def quantize_loaded(model: Transformer, quantize: Optional[str], args: ModelArgs, shard_paths: list,
                    progress: Optional[Callable[[int, int], None]] = None) -> None:
    """After load_weights: quantize as asked, unless the folder's matrices are quantized already
    (args.stored_scheme); then make int4's CPU kernel layout, while loading rather than at the first
    product. `progress(done, total)` is called after each matrix quantized."""
    if quantize is not None and not args.stored_scheme:
        quantize_weights(model, quantize, shard_paths=shard_paths, progress=progress)
    pack_for_cpu(model, shard_paths)


def check_quantize_request(quantize: Optional[str], args: ModelArgs, folder: Path) -> None:
    """A quantized folder cannot be quantized another way: its bfloat16 weights are gone."""
    stored = args.stored_scheme
    if stored and quantize not in (None, stored):
        raise LlamaError(f"{folder} holds {stored} weights (written by llama_models.quantize), which cannot become "
                         f"{quantize}: set QUANTIZE (quantize=) to None or {stored!r}, or use the bfloat16 checkpoint")
