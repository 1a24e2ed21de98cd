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

import difflib
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .args import LlamaError, ModelArgs
from .devices import resolve_device, resolve_dtype
from .model import Transformer
from .parallel import every_process_or_none, init_model_parallel, model_parallel_rank_and_size
from .quantize import pack_for_cpu, quantize as quantize_weights
from .sharding import (QUANTIZED_PART_SPLIT, ShardFiles, args_for_model_parallel, check_world_size, first_shard_of,
                       local_state_dict, release_mapped_pages, same_memory)
from .tokenizer import Tokenizer

QUANTIZED_PART_NAMES = tuple(f".{part}" for part in QUANTIZED_PART_SPLIT)  # of a quantize tool's matrices


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


def checkpoint_folder(models_dir: str, model_name: str, script: str) -> Path:
    """The folder a script runs: LLAMA_CHECKPOINT_DIR where it is set, else the script's settings
    LLAMA_MODELS_DIR / MODEL_NAME, with ~ expanded. Where there is none, one line says what chose
    it and names a folder beside it of a close name."""
    for name, value in (("MODEL_NAME", model_name), ("LLAMA_MODELS_DIR", models_dir)):
        if not isinstance(value, str):
            raise LlamaError(f"{name} = {value!r}: write a folder name in quotes")
    from_environment = os.environ.get("LLAMA_CHECKPOINT_DIR")
    folder = Path(from_environment or Path(models_dir).expanduser() / model_name).expanduser()
    if not folder.is_dir():
        fix = ("correct the LLAMA_CHECKPOINT_DIR environment variable, which names it (or unset it to use "
               "MODEL_NAME and LLAMA_MODELS_DIR)" if from_environment else
               f"set MODEL_NAME and LLAMA_MODELS_DIR at the top of {script}, or the LLAMA_CHECKPOINT_DIR "
               "environment variable")
        raise LlamaError(f"no checkpoint folder at {folder}{nearby_folder(folder)}: {fix}, or download a model "
                         "(README, Download a model)")
    return folder


def nearby_folder(folder: Path) -> str:
    """ " (did you mean Llama3.2-1B-Instruct?)" where the missing folder's parent holds one of a name
    close to it, in any case."""
    try:
        siblings = [path.name for path in folder.parent.iterdir() if path.is_dir()]
    except OSError:  # no such parent either, or not ours to list
        siblings = []
    by_lower_case = {name.lower(): name for name in siblings}
    meant = difflib.get_close_matches(folder.name.lower(), by_lower_case, n=1, cutoff=0.8)
    if not meant:
        return ""
    name = by_lower_case[meant[0]]
    # in quotes where it would look like the name given (another Unicode form, a space at the end) or
    # holds what a terminal would act on
    looks_alike = unicodedata.normalize("NFC", name).strip() == unicodedata.normalize("NFC", folder.name).strip()
    return f" (did you mean {name!r}?)" if looks_alike or not name.isprintable() else f" (did you mean {name}?)"


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
