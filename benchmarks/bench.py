"""Speed and memory of our Llama 3.x code, side by side with Hugging Face transformers and the roofline.

    python benchmarks/bench.py                          # Llama-3.2-1B shape, bfloat16 and float32
    python benchmarks/bench.py --shape 8b --dtypes bf16 --json results-8b.json
    python benchmarks/bench.py --skip-transformers      # ours and the roofline only
    python benchmarks/bench.py --emulate-avx2           # as on a CPU without bfloat16 instructions

What it does, in one run:

1. Writes a random-weight checkpoint in Meta's layout (params.json, tokenizer.model,
   consolidated.00.pth in bfloat16) at a real Llama shape, once, into the cache folder
   (~/.cache/llama-models-bench/<shape>/meta), plus the same weights in transformers' layout
   (<shape>/transformers). Random values run exactly as fast as trained ones; nothing is downloaded.
2. Measures this machine's memory bandwidth with the fastest streaming read PyTorch does (a
   reduction over 2 GiB, llama_models/llama3/bandwidth.py), before and after the runs, and turns it
   into the roofline: the fastest decode possible when every token must read all weights.
3. For each dtype, runs our code and transformers' LlamaForCausalLM.generate, each in a fresh
   subprocess (so its peak RSS is its own): load time, RSS, prefill of a 128-token prompt (or
   --prompt-tokens), greedy decode, beam search of width 4.
4. Prints a table (each of ours as a ratio to transformers and to the roofline, with the targets
   of the benchmark issue) and, with --json PATH, writes every number.

Timings are taken in one run on one machine, so read the ratios rather than the absolute numbers:
other processes running at the same time slow both sides. A step is timed from the start of one
forward pass to the start of the next; a decode rate is 1 / the median step over --repeats
generations (after a warm-up), so bursts of load from other processes count little, and a
prefill is the fastest of 5 generations of one token.

Needs torch and our package; the transformers columns need transformers (a dev dependency).
"""

import argparse
import base64
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run_inference.py lives at the repository root
sys.path.insert(1, str(REPO_ROOT / "llama-models"))  # our package, when it is not pip-installed
sys.path.insert(2, str(REPO_ROOT / "tests"))  # Meta's tensor layout and the transformers key mapping

import checkpoints as test_checkpoints  # noqa: E402  (after the path set-up above)
from llama_models.llama3 import ModelArgs  # noqa: E402
from llama_models.llama3.bandwidth import memory_read_bandwidth  # noqa: E402
from llama_models.llama3.quantize import STORED_SCHEMES  # noqa: E402
from llama_models.cli import OneLineParser  # noqa: E402  (argparse's errors, in one line)

# params.json of Meta's releases (see ../shared/llama3-facts.md, section 2.1).
COMMON_PARAMS = {"vocab_size": 128256, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}
SHAPES = {
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.5, "multiple_of": 256},
    "3b": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "ffn_dim_multiplier": 1.0, "multiple_of": 256},
    "8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 1024},
}
SHAPE_NAMES = {"1b": "Llama-3.2-1B", "3b": "Llama-3.2-3B", "8b": "Llama-3.1-8B"}
N_BASE_TOKENS = 128000  # lines of tokenizer.model; the 256 special tokens make vocab_size 128256
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "f32": "float32"}
DEFAULT_PROMPT_TOKENS = 128
BEAM_WIDTH = 4  # both sides' beam search, the same rules (transformers' early_stopping=True)
LENGTH_PENALTY = 1.0
# A prefill is short, so a burst of load from another process can double one; the best of several is
# the code's own speed. Timed apart from the generations.
PREFILL_REPEATS = 5
MIB = 2**20
GIB = 2**30
DEFAULT_CACHE = Path("~/.cache/llama-models-bench").expanduser()
# Environment variables that cap PyTorch's CPU kernels (ATen's own, oneDNN's and MKL's) at AVX2, so
# that a CPU with bfloat16 instructions runs the way most laptops do, without them (--emulate-avx2).
# Memory bandwidth and core count stay this machine's, so only compute-bound steps are emulated.
AVX2_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# The parent kills a worker when the machine's available memory falls below this, and reports
# "out of memory", rather than let the kernel's OOM killer pick a victim (maybe another process).
MEMORY_GUARD_BYTES = 600 * MIB


# ================================================================================================
# The checkpoint in Meta's layout
# ================================================================================================


def model_args(shape: str) -> ModelArgs:
    return ModelArgs.from_params(meta_params(shape))


def meta_params(shape: str) -> dict:
    return dict(sorted((SHAPES[shape] | COMMON_PARAMS).items()))  # Meta's files list keys alphabetically


def meta_tensor_shapes(args: ModelArgs) -> dict:
    """{name: shape} of a single-shard Meta checkpoint (the tests' table). We always write a separate
    output.weight: Meta's 1B/3B files hold one too (equal to the embedding); this costs the most memory."""
    shape = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                 multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier, with_output=True)
    return test_checkpoints.meta_tensor_shapes(shape, args.vocab_size)


def write_tokenizer(path: Path) -> None:
    """A valid 128,000-token tokenizer.model: every single byte, every pair of bytes, then three-byte
    tokens (a pair plus a byte, so BPE can reach them). Its content does not change the speed; it
    exists so the loader's check vocab_size == 256 special + base tokens holds, without Meta's file."""
    singles = [bytes([b]) for b in range(256)]
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
    triples = (pair + bytes([b]) for pair in pairs for b in range(256))
    tokens = itertools.islice(itertools.chain(singles, pairs, triples), N_BASE_TOKENS)
    lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(tokens))
    path.write_text("".join(lines), encoding="ascii")


def fill_random(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """In place, in bfloat16: norms near 1, matrices ~ N(0, 1/fan_in) like a trained model's, so the
    activations stay in a realistic range."""
    torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype, out=tensor)
    if name.endswith("norm.weight"):
        tensor.mul_(0.1).add_(1.0)
    else:
        tensor.mul_(tensor.shape[-1] ** -0.5)


def write_weights(path: Path, shapes: dict, seed: int = 0) -> None:
    """torch.save a {name: random bfloat16 tensor} dict without ever holding it in memory (8B is
    16 GB): the quantize tool's way, each tensor filled in place in the memory-mapped file."""
    from llama_models.quantize import write_in_place

    def fill(mapped: dict) -> None:
        generator = torch.Generator().manual_seed(seed)
        for name in shapes:  # a fixed order, so the same seed gives the same weights
            fill_random(name, mapped[name], generator)

    write_in_place(path, {name: (shape, torch.bfloat16) for name, shape in shapes.items()}, fill)


def ensure_meta_checkpoint(cache_dir: Path, shape: str) -> Path:
    """The cached Meta-layout folder for this shape, written first if missing or incomplete."""
    folder = cache_dir / shape / "meta"
    weights = folder / "consolidated.00.pth"
    params_text = json.dumps(meta_params(shape))
    if weights.is_file() and (folder / "params.json").is_file() and (folder / "params.json").read_text() == params_text:
        return folder
    args = model_args(shape)
    shapes = meta_tensor_shapes(args)
    size = sum(math.prod(s) for s in shapes.values()) * 2
    print(f"writing a random {SHAPE_NAMES[shape]}-shaped checkpoint ({size / GIB:.1f} GiB) to {folder} ...", flush=True)
    check_free_disk(folder, size)
    started = time.perf_counter()
    stale_conversion = hf_folder_for(folder) / "model.safetensors.index.json"
    stale_conversion.unlink(missing_ok=True)  # new weights: convert them again
    write_tokenizer(folder / "tokenizer.model")
    partial = folder / "consolidated.00.pth.partial"  # renamed when complete: an interrupted write is redone
    write_weights(partial, shapes)
    (folder / "params.json").write_text(params_text)
    os.replace(partial, weights)
    print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def check_free_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:
        sys.exit(f"error: {folder} has {free / GIB:.1f} GiB free, the checkpoint needs {needed / GIB:.1f} GiB: "
                 "free some space or pass --cache-dir")


# ================================================================================================
# The same weights in transformers' layout
# ================================================================================================
# transformers' users load `config.json` + `*.safetensors` with from_pretrained, so that is what we
# time. Two differences from Meta's layout: the names, and RoPE's pairing. Meta rotates adjacent
# channels (0,1), (2,3), ...; transformers rotates channel j with j + head_dim/2. Ordering each head's
# rows of wq and wk as (0, 2, 4, ..., 1, 3, 5, ...) makes both compute the same attention.

HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
HF_SHARD_BYTES = GIB  # safetensors copies a shard into memory while writing it: keep shards small


def hf_name(meta_name: str) -> str:
    from hf_reference import META_TO_HF_LAYER_KEYS  # tests/hf_reference.py needs transformers

    if meta_name in HF_TOP_NAMES:
        return HF_TOP_NAMES[meta_name]
    _, index, rest = meta_name.split(".", 2)
    return f"model.layers.{index}.{META_TO_HF_LAYER_KEYS[rest]}"


def hf_tensor(meta_name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    from hf_reference import interleaved_to_half_split_rows

    if meta_name.endswith("attention.wq.weight"):
        return interleaved_to_half_split_rows(tensor, args.n_heads)
    if meta_name.endswith("attention.wk.weight"):
        return interleaved_to_half_split_rows(tensor, args.n_kv_heads)
    return tensor


def hf_config(shape: str, args: ModelArgs):
    """The tests' config for these weights (tests/hf_reference.py), marked as the bfloat16 they are."""
    from hf_reference import hf_config as reference_config

    config = reference_config(meta_params(shape), tied=False, rope_scale_factor=args.rope_scale_factor)
    config.dtype = "bfloat16"
    return config


def hf_folder_for(meta_folder: Path) -> Path:
    """Where the same weights are kept in transformers' layout: <shape>/transformers beside <shape>/meta."""
    return meta_folder.parent / "transformers"


def ensure_hf_checkpoint(meta_folder: Path, shape: str) -> Path:
    """The cached transformers folder (config.json + sharded safetensors), converted if missing."""
    from safetensors.torch import save_file

    folder = hf_folder_for(meta_folder)
    index_path = folder / "model.safetensors.index.json"  # written last: it marks a complete folder
    if index_path.is_file():
        return folder
    print(f"converting it to transformers' layout in {folder} ...", flush=True)
    check_free_disk(folder, (meta_folder / "consolidated.00.pth").stat().st_size)
    started, args = time.perf_counter(), model_args(shape)
    hf_config(shape, args).save_pretrained(folder)
    meta = torch.load(meta_folder / "consolidated.00.pth", mmap=True, weights_only=True)
    shards, weight_map, total = shard_names(meta), {}, 0
    for number, names in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {hf_name(name): hf_tensor(name, meta[name], args) for name in names}
        save_file(tensors, folder / file_name, metadata={"format": "pt"})
        weight_map |= {name: file_name for name in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def shard_names(state_dict: dict) -> list:
    """Group the names into runs of at most HF_SHARD_BYTES (a larger tensor gets a shard alone)."""
    shards, current, current_bytes = [], [], 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > HF_SHARD_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    return shards + [current] if current else shards


# ================================================================================================
# The machine and the roofline
# ================================================================================================


def describe_machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    flags = Path("/proc/cpuinfo").read_text()
    extensions = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {name}" in flags]
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {"cpu": cpu, "cpu_extensions": extensions, "cores": os.cpu_count(),
            "ram_gib": round(meminfo_bytes("MemTotal") / GIB, 1), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers_version,
            "python": platform.python_version()}


def meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def bytes_per_token(args: ModelArgs, dtype: torch.dtype, kv_len: float, batch: int = 1) -> float:
    """Bytes one decode step must read: every weight matrix once (shared by the whole batch), one row
    of the embedding table per sequence, and each sequence's keys and values so far."""
    element = dtype.itemsize
    shapes = meta_tensor_shapes(args)
    weights = sum(math.prod(s) for name, s in shapes.items() if name != "tok_embeddings.weight")
    embedding_rows = batch * args.dim
    kv_cache = batch * args.n_layers * 2 * kv_len * args.n_kv_heads * args.head_dim
    return (weights + embedding_rows + kv_cache) * element


def ideal_memory_bytes(args: ModelArgs, dtype: torch.dtype, prompt_tokens: int, new_tokens: int) -> int:
    """Weights in `dtype` plus the KV cache both sides hold: BEAM_WIDTH sequences of prompt + answer."""
    element = dtype.itemsize
    weights = sum(math.prod(s) for s in meta_tensor_shapes(args).values())
    kv_cache = BEAM_WIDTH * (prompt_tokens + new_tokens) * args.n_layers * 2 * args.n_kv_heads * args.head_dim
    return (weights + kv_cache) * element


# ================================================================================================
# Workers: one framework, one dtype, in a fresh process
# ================================================================================================
# A worker saves its report to a JSON file after every stage, so a worker killed half-way (out of
# memory) still tells how far it got. Times are in seconds, memory in MiB.


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: the peak of VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def rss_mib() -> float:
    return status_mib("VmRSS")


def peak_rss_mib() -> float:
    # Not getrusage's ru_maxrss: Linux carries the parent's peak over fork + exec, so a worker
    # would report the parent's peak (which reaches 16 GB while it writes the 8B checkpoint).
    return status_mib("VmHWM")


def random_prompt(length: int) -> list:
    """Random ids among the base tokens: the same for both frameworks (content does not matter)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, N_BASE_TOKENS, (length,), generator=generator).tolist()


class Report(dict):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def save(self, **values):
        self.update(values)
        partial = self.path.with_suffix(".partial")  # a worker killed mid-write leaves the last whole report
        partial.write_text(json.dumps(self))
        os.replace(partial, self.path)


class ForwardClock:
    """Records when each forward pass of a model starts, with a hook on its token embedding.

    Every forward pass starts by embedding its tokens. The first passes are the prefill (ours: one
    per 512-token chunk of the prompt; transformers: one), each later one a decode step. So the
    time from one start to the next is one complete step (forward pass, choosing the token, for beam
    search reordering the cache), measured the same way for both, greedy and beam alike, without
    touching either's generation code.
    """

    def __init__(self, embedding: torch.nn.Module):
        self.starts = []
        embedding.register_forward_pre_hook(lambda module, inputs: self.starts.append(time.perf_counter()))

    def time_generation(self, generate, prefill_passes: int, new_tokens: int) -> tuple[float, list]:
        """Run generate(); return (prefill seconds, [seconds of each decode step]). The prefill takes
        `prefill_passes` forward passes (ours: one per PREFILL_CHUNK prompt tokens), then each new
        token but the last one costs one more."""
        self.starts = []
        generate()
        passes = prefill_passes + new_tokens - 1
        if len(self.starts) != passes:  # the steps would be misattributed
            raise RuntimeError(f"expected {passes} forward passes, the clock saw {len(self.starts)}")
        marks = self.starts + [time.perf_counter()]
        decode_marks = marks[prefill_passes:]
        return decode_marks[0] - marks[0], [later - earlier for earlier, later in itertools.pairwise(decode_marks)]


def best_prefill(clock: ForwardClock, first_token, prefill_passes: int) -> float:
    """The fastest of PREFILL_REPEATS prefills; first_token() generates the first token only."""
    return min(clock.time_generation(first_token, prefill_passes, 1)[0] for _ in range(PREFILL_REPEATS))


def time_repeatedly(clock: ForwardClock, generate, repeats: int, prefill_passes: int, new_tokens: int) -> dict:
    """The decode steps of `repeats` generations: the median step, the fastest, and all of them.

    Other processes on the machine (a test run, say) slow some steps down several times over; the
    median ignores such bursts as long as they cover less than half of the steps.
    """
    steps = []
    for _ in range(repeats):
        _, step_times = clock.time_generation(generate, prefill_passes, new_tokens)
        steps += step_times
    return step_summary(steps)


def step_summary(steps: list) -> dict:
    """Seconds of decode steps -> the median step, the fastest, and all of them."""
    return {"step_s": statistics.median(steps), "step_min_s": min(steps), "steps_s": steps}


def ours_greedy(model, prompt: list, tokens: int) -> list:
    """Our greedy decoding of `tokens` tokens (1: the prefill and the token it picks)."""
    import run_inference

    return list(run_inference.greedy_decode(model, prompt, tokens))  # no forward pass after the last token


def ours_prefill_passes(prompt_tokens: int) -> int:
    import run_inference

    return math.ceil(prompt_tokens / run_inference.PREFILL_CHUNK)  # one forward pass per chunk


def transformers_generate(model, prompt: torch.Tensor, tokens: int, **options) -> torch.Tensor:
    # No end-of-text token is configured, so it generates exactly `tokens` tokens, like ours.
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, do_sample=False,
                          **options)


def worker_ours(folder: Path, dtype: torch.dtype, prompt_tokens: int, new_tokens: int, repeats: int,
                report: Report, quantize: str = None) -> None:
    from llama_models.llama3 import load_llama, products

    import run_inference

    prompt = random_prompt(prompt_tokens)
    report.save(rss_baseline_mib=rss_mib())  # the interpreter, torch and our imports
    started = time.perf_counter()
    # max_batch_size = BEAM_WIDTH: one process serves greedy (batch 1) and beam search (batch 4).
    model, _ = load_llama(folder, device="cpu", dtype=dtype, max_seq_len=prompt_tokens + new_tokens,
                          max_batch_size=BEAM_WIDTH, quantize=quantize)
    report.save(load_s=time.perf_counter() - started, rss_after_load_mib=rss_mib())

    # Warm-up: the first prefill also reads every weight from the memory-mapped file for the first time.
    ours_greedy(model, prompt, 1)
    report.save(first_token_s=time.perf_counter() - started, rss_after_first_forward_mib=rss_mib())

    def beam():
        return run_inference.beam_search(model, prompt, BEAM_WIDTH, new_tokens, stop_tokens=frozenset(),
                                         length_penalty=LENGTH_PENALTY)

    clock = ForwardClock(model.tok_embeddings)
    passes = ours_prefill_passes(prompt_tokens)
    report.save(prefill_s=best_prefill(clock, lambda: ours_greedy(model, prompt, 1), passes))
    report.save(greedy=time_repeatedly(clock, lambda: ours_greedy(model, prompt, new_tokens), repeats, passes,
                                       new_tokens))
    report.save(beam=time_repeatedly(clock, beam, repeats, passes, new_tokens), peak_rss_mib=peak_rss_mib())
    report.save(kernels=chosen_kernels(products.CPU_CHOOSER))


def chosen_kernels(chooser) -> dict:
    """{"rows 1": {kernel name: how many weight shapes chose it}, ...}: what products.py measured fastest."""
    by_rows = {}
    for (_, _, rows), kernel in sorted(chooser.chosen.items(), key=lambda item: item[0][2]):
        counts = by_rows.setdefault(f"rows <= {rows}" if rows > 1 else "rows 1", {})
        counts[kernel.name] = counts.get(kernel.name, 0) + 1
    return by_rows


def worker_transformers(folder: Path, dtype: torch.dtype, prompt_tokens: int, new_tokens: int, repeats: int,
                        report: Report) -> None:
    from transformers import LlamaForCausalLM

    prompt = torch.tensor([random_prompt(prompt_tokens)])
    report.save(rss_baseline_mib=rss_mib())
    started = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    report.save(load_s=time.perf_counter() - started, rss_after_load_mib=rss_mib())

    transformers_generate(model, prompt, 1)  # warm-up
    report.save(first_token_s=time.perf_counter() - started, rss_after_first_forward_mib=rss_mib())

    def greedy():
        return transformers_generate(model, prompt, new_tokens)

    def beam():
        return transformers_generate(model, prompt, new_tokens, num_beams=BEAM_WIDTH, early_stopping=True,
                                     length_penalty=LENGTH_PENALTY)

    clock = ForwardClock(model.get_input_embeddings())
    # transformers runs the whole prompt in one forward pass.
    report.save(prefill_s=best_prefill(clock, lambda: transformers_generate(model, prompt, 1), 1))
    report.save(greedy=time_repeatedly(clock, greedy, repeats, 1, new_tokens))
    report.save(beam=time_repeatedly(clock, beam, repeats, 1, new_tokens), peak_rss_mib=peak_rss_mib())


def worker_prefills_side_by_side(folder: Path, dtype: torch.dtype, prompt_tokens: int, new_tokens: int,
                                 repeats: int, report: Report) -> None:
    """Both models in one process, prefilling in turns (the order swapped every round), the best of
    PREFILL_REPEATS each. A prefill is short and compute-bound, and the CPU time this shared machine
    gives a process moves more between two processes a minute apart than the two prefills differ:
    on a 2-core Intel Xeon (README, "Intel Xeon with AMX"), the separate workers' prefill ratio
    ranged from 0.82 to 1.10 over runs of the same code."""
    from llama_models.llama3 import load_llama
    from transformers import LlamaForCausalLM

    prompt = random_prompt(prompt_tokens)
    ours, _ = load_llama(folder, device="cpu", dtype=dtype, max_seq_len=prompt_tokens + 1)
    theirs = LlamaForCausalLM.from_pretrained(hf_folder_for(folder), dtype=dtype,
                                              attn_implementation="sdpa").eval()
    prompt_ids = torch.tensor([prompt])
    sides = {  # side: (clock, generate the first token, forward passes that takes)
        "ours": (ForwardClock(ours.tok_embeddings), lambda: ours_greedy(ours, prompt, 1),
                 ours_prefill_passes(prompt_tokens)),
        "transformers": (ForwardClock(theirs.get_input_embeddings()),
                         lambda: transformers_generate(theirs, prompt_ids, 1), 1),
    }
    times = {side: [] for side in sides}
    for _, first_token, _ in sides.values():
        first_token()  # warm-up
    for round_number in range(PREFILL_REPEATS):
        order = list(sides) if round_number % 2 == 0 else list(reversed(sides))
        for side in order:
            clock, first_token, passes = sides[side]
            times[side].append(clock.time_generation(first_token, passes, 1)[0])
    report.save(prefill_s={side: min(side_times) for side, side_times in times.items()}, prefill_times_s=times)


def worker_quantize_tool(folder: Path, dtype: torch.dtype, prompt_tokens: int, new_tokens: int, repeats: int,
                         report: Report, quantize: str = None) -> None:
    """`python -m llama_models.quantize folder folder.parent/<scheme> <scheme>`, timed, with its peak RSS."""
    from llama_models.quantize import quantize_checkpoint

    report.save(rss_baseline_mib=rss_mib())
    started = time.perf_counter()
    quantize_checkpoint(folder, quantized_folder(folder, quantize), quantize)
    report.save(tool_s=time.perf_counter() - started, peak_rss_mib=peak_rss_mib())


def quantized_folder(meta_folder: Path, scheme: str) -> Path:
    return meta_folder.parent / scheme


# Decoding after a long text (--cached N): decode steps at N positions already in the KV cache.
# The N positions are not prefilled (a long prefill in bfloat16 is slow where the CPU has no bfloat16
# arithmetic): each side's cache is left holding zeros, and the numbers in it do not change a step's
# work. Each side's step is its model's forward pass called directly, not through a generation loop.


def time_cached_steps(step, cached: int, new_tokens: int, repeats: int) -> dict:
    """step(position) runs one decode step; a warm-up pass over the positions (where products.py
    runs its trials), then `repeats` timed passes: the median step, the fastest, and all of them."""
    for position in range(cached, cached + new_tokens):
        step(position)
    steps = []
    for _ in range(repeats):
        for position in range(cached, cached + new_tokens):
            started = time.perf_counter()
            step(position)
            steps.append(time.perf_counter() - started)
    return step_summary(steps)


def worker_ours_cached(folder: Path, dtype: torch.dtype, prompt_tokens: int, new_tokens: int, repeats: int,
                       report: Report, cached: int) -> None:
    from llama_models.llama3 import load_llama, products

    model, _ = load_llama(folder, device="cpu", dtype=dtype, max_seq_len=cached + new_tokens)
    token = torch.tensor([[random_prompt(1)[0]]])
    with torch.inference_mode():
        report.save(cached_decode=time_cached_steps(lambda position: model(token, start_pos=position), cached,
                                                    new_tokens, repeats))
    report.save(attention_kernels=products.chosen_attention(torch.device("cpu"), batch=1))


def worker_transformers_cached(folder: Path, dtype: torch.dtype, prompt_tokens: int, new_tokens: int, repeats: int,
                               report: Report, cached: int) -> None:
    from transformers import DynamicCache, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    config = model.config
    cache = DynamicCache()
    kv_shape = (1, config.num_key_value_heads, cached, config.head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.zeros(kv_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype), layer)
    token = torch.tensor([[random_prompt(1)[0]]])

    def step(position: int) -> None:
        if position == cached and cache.get_seq_length() > cached:  # a new pass: back to the N cached ones
            cache.crop(cached - cache.get_seq_length())  # (a negative count: remove that many)
        model(input_ids=token, cache=cache, use_cache=True)  # it takes the position from the cache's length

    with torch.inference_mode():
        report.save(cached_decode=time_cached_steps(step, cached, new_tokens, repeats))


WORKERS = {"ours": worker_ours, "transformers": worker_transformers,
           "side_by_side": worker_prefills_side_by_side, "quantize_tool": worker_quantize_tool,
           "ours_cached": worker_ours_cached, "transformers_cached": worker_transformers_cached}


def run_worker_main(options) -> None:
    report = Report(Path(options.result))
    extra = {"quantize": options.scheme} if options.scheme else {}  # ours only
    if options.worker.endswith("_cached"):
        extra["cached"] = options.cached
    WORKERS[options.worker](Path(options.checkpoint), DTYPES[options.dtype], options.prompt_tokens, options.new_tokens,
                            options.repeats, report, **extra)


# ================================================================================================
# The parent: start workers, watch memory
# ================================================================================================


def run_worker(worker: str, folder: Path, dtype: str, options, scheme: str = None) -> dict:
    """Run one worker in a fresh process; returns its report, with "error" set if it failed."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "report.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--checkpoint", str(folder),
                   "--dtype", dtype, "--prompt-tokens", str(options.prompt_tokens),
                   "--new-tokens", str(options.new_tokens), "--repeats", str(options.repeats), "--result", str(result),
                   "--cached", str(options.cached)]
        command += ["--scheme", scheme] if scheme else []
        what = scheme or (f"{folder.name} folder" if folder.name in STORED_SCHEMES else DTYPE_NAMES[dtype])
        print(f"  {worker:<13} {what} ...", end="", flush=True)
        read_into_page_cache(folder)
        started = time.perf_counter()
        environment = {**os.environ, **(AVX2_ENVIRONMENT if options.emulate_avx2 else {})}
        error, output = watch(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               env=environment, start_new_session=True))
        report = json.loads(result.read_text()) if result.is_file() else {}
    print(f" {time.perf_counter() - started:.0f} s" + (f"  FAILED: {error}" if error else ""), flush=True)
    if error:
        report["error"] = error
        if not error.startswith("out of memory"):
            print("\n".join("      " + line for line in output.splitlines()[-15:]))
    return report


def read_into_page_cache(folder: Path) -> None:
    """Read a checkpoint's files once, so that every worker starts with its files in the OS page
    cache. Otherwise the order of the runs would decide: two 15 GB copies of 8B do not both fit
    in 24 GiB, and the side that ran last would find its file cached and the other's not."""
    buffer = bytearray(64 * MIB)
    for path in sorted(folder.iterdir()):
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def watch(process: subprocess.Popen) -> tuple:
    """Wait for the worker, killing it if available memory runs out. Returns (error or None, output)."""
    output_file = process.stdout
    os.set_blocking(output_file.fileno(), False)
    chunks, killed_for_memory = [], False
    while process.poll() is None:
        chunks.append(output_file.read() or b"")
        if meminfo_bytes("MemAvailable") < MEMORY_GUARD_BYTES:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the worker and nothing else
            killed_for_memory = True
            process.wait()
        time.sleep(0.2)
    chunks.append(output_file.read() or b"")
    output = b"".join(chunks).decode(errors="replace")
    if killed_for_memory:
        return f"out of memory (killed below {MEMORY_GUARD_BYTES // MIB} MiB available)", output
    if process.returncode == -signal.SIGKILL:
        return "killed (SIGKILL: the kernel's out-of-memory killer?)", output
    if process.returncode != 0:
        last = output.strip().splitlines()[-1] if output.strip() else f"exit status {process.returncode}"
        return last[:200], output
    return None, output


# ================================================================================================
# The table
# ================================================================================================


def derived_metrics(report: dict, prompt_tokens: int) -> dict:
    """Rates, and memory net of the process's own baseline (interpreter and libraries)."""
    out = {}
    if "greedy" in report:
        out["decode_tok_s"] = 1 / report["greedy"]["step_s"]
    if "cached_decode" in report:
        out["cached_decode_tok_s"] = 1 / report["cached_decode"]["step_s"]
    if "prefill_s" in report:
        out["prefill_tok_s"] = prompt_tokens / report["prefill_s"]
    if "beam" in report:
        out["beam_steps_s"] = 1 / report["beam"]["step_s"]
        out["beam_step_vs_greedy"] = report["beam"]["step_s"] / report["greedy"]["step_s"]
    for key in ("load_s", "first_token_s"):
        if key in report:
            out[key] = report[key]
    for key in ("rss_after_load_mib", "rss_after_first_forward_mib", "peak_rss_mib"):
        if key in report:
            out[key] = report[key] - report["rss_baseline_mib"]
    return out


def at_least(value, limit):
    """None (cannot be judged) when the value is missing, e.g. transformers was not run."""
    return None if value is None else value >= limit


# (key, label, roofline key or None, target check or None, target text). A check gets (ours,
# ours/transformers, ours/roofline) and says True, False or None (not measured in this run).
ROWS = [
    ("decode_tok_s", "decode tok/s", "decode_tok_s",
     lambda o, t, r: None if t is None else r >= 0.55 and t >= 1.25, ">=0.55 roofline, >=1.25 vs tf (bf16)"),
    ("cached_decode_tok_s", "decode tok/s, --cached positions", "cached_decode_tok_s", None, ""),
    ("prefill_tok_s", "prefill tok/s", None, lambda o, t, r: at_least(t, 1.0), ">=1 vs tf"),
    ("beam_steps_s", "beam-4 steps/s", "beam_steps_s", None, ""),
    ("beam_step_vs_greedy", "beam-4 step / greedy step (x)", None, lambda o, t, r: o <= 1.6, "<=1.6"),
    ("load_s", "load s", None, None, ""),
    ("first_token_s", "load + first token s", None, None, ""),
    ("rss_after_load_mib", "RSS after load MiB", "memory_mib", None, ""),
    ("rss_after_first_forward_mib", "RSS after 1st forward MiB", "memory_mib", None, ""),
    ("peak_rss_mib", "peak RSS MiB", "memory_mib", lambda o, t, r: r <= 1.1, "<=1.10 x ideal"),
]
VERDICTS = {True: "yes", False: "NO", None: "not measured"}
HEADER = ("metric", "ours", "transformers", "ours/tf", "roofline", "ours/roofl", "target")


def fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def table_rows(dtype: str, ours: dict, theirs: dict, roofline: dict) -> list:
    rows = []
    for key, label, roof_key, check, target_text in ROWS:
        mine, other, roof = ours.get(key), theirs.get(key), roofline.get(roof_key)
        if mine is None and other is None:  # not measured in this run (--cached), or both failed (see the notes)
            continue
        vs_tf = mine / other if mine is not None and other else None
        vs_roof = mine / roof if mine is not None and roof else None
        target = ""
        applies = check is not None and mine is not None and not (key == "decode_tok_s" and dtype != "bf16")
        if applies:
            target = f"{target_text}: {VERDICTS[check(mine, vs_tf, vs_roof)]}"
        rows.append((label, fmt(mine), fmt(other), fmt(vs_tf), fmt(roof), fmt(vs_roof), target))
    return rows


def markdown_row(cells, widths) -> str:
    """Text columns (the first and last) aligned left, numbers right."""
    last = len(cells) - 1
    padded = [str(cell).ljust(width) if i in (0, last) else str(cell).rjust(width)
              for i, (cell, width) in enumerate(zip(cells, widths, strict=True))]
    return "| " + " | ".join(padded) + " |"


def print_table(title: str, rows: list, notes: list, header: tuple = HEADER) -> None:
    print(f"\n### {title}\n")
    if rows:  # none when the dtype was skipped
        widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
        print(markdown_row(header, widths))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in rows:
            print(markdown_row(row, widths))
        print()
    print("\n".join(notes))


def roofline_for(args: ModelArgs, dtype: torch.dtype, bandwidth: float, prompt_tokens: int, new_tokens: int,
                 cached: int) -> dict:
    kv_len = prompt_tokens + new_tokens / 2  # the average position of a decode step
    return {
        "bytes_per_token": bytes_per_token(args, dtype, kv_len),
        "decode_tok_s": bandwidth / bytes_per_token(args, dtype, kv_len),
        "cached_decode_tok_s": bandwidth / bytes_per_token(args, dtype, cached + new_tokens / 2) if cached else None,
        "beam_steps_s": bandwidth / bytes_per_token(args, dtype, kv_len, batch=BEAM_WIDTH),
        "memory_mib": ideal_memory_bytes(args, dtype, prompt_tokens, new_tokens) / MIB,
    }


# ================================================================================================
# main
# ================================================================================================


def parse_options(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="model shape (default %(default)s)")
    parser.add_argument("--dtypes", default="bf16,f32", help="comma-separated, of bf16 and f32 (default both)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help="prompt length (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per measurement (default %(default)s)")
    parser.add_argument("--skip-transformers", action="store_true", help="ours and the roofline only")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="cap the workers' CPU kernels at AVX2, as on a CPU without bfloat16 instructions")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"checkpoints go here ({DEFAULT_CACHE})")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--quantize", default="", help="comma-separated, of int8, int4 and fp16: our quantized "
                        "(or fp16-packed) model too, beside our bfloat16 one")
    parser.add_argument("--cached", type=int, default=0, help="also decode at this many positions already in "
                        "the KV cache, e.g. 4096 (default 0: not measured)")
    for internal in ("--worker", "--checkpoint", "--dtype", "--result", "--scheme"):  # the parent calls itself
        parser.add_argument(internal, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.dtypes = [d.strip() for d in options.dtypes.split(",") if d.strip()]
    unknown = [d for d in options.dtypes if d not in DTYPES]
    if unknown or not options.dtypes:
        parser.error(f"--dtypes: use bf16 and/or f32, not {','.join(unknown) or 'nothing'}")
    options.quantize = [scheme.strip() for scheme in options.quantize.split(",") if scheme.strip()]
    unknown = [scheme for scheme in options.quantize if scheme not in QUANTIZE_TARGETS]
    if unknown:
        parser.error(f"--quantize: use int8, int4 and/or fp16, not {','.join(unknown)}")
    if options.quantize and "bf16" not in options.dtypes:
        parser.error("--quantize compares with our bfloat16 model: keep bf16 in --dtypes")
    if options.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first token comes from the prefill)")
    if options.prompt_tokens < 1:
        parser.error("--prompt-tokens must be at least 1")
    if options.repeats < 1:
        parser.error("--repeats must be at least 1")
    if options.cached < 0:
        parser.error("--cached must be 0 (not measured) or more")
    return options


def transformers_available() -> bool:
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def skip_reason(args: ModelArgs, dtype: str) -> str:
    """Weights that cannot fit in this machine's memory are not attempted (8B in float32 is 32 GB)."""
    needed = ideal_memory_bytes(args, DTYPES[dtype], 0, 0)
    if needed > 0.9 * meminfo_bytes("MemTotal"):
        return f"skipped: {DTYPE_NAMES[dtype]} weights need {needed / GIB:.1f} GiB, this machine has " \
               f"{meminfo_bytes('MemTotal') / GIB:.1f} GiB"
    return ""


def print_machine(machine: dict) -> None:
    print(f"machine: {machine['cpu']} ({', '.join(machine['cpu_extensions'])}), {machine['cores']} cores, "
          f"{machine['ram_gib']} GiB RAM; torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"transformers {machine['transformers'] or 'not installed'}, python {machine['python']}")


def measure_memory_bandwidth(when: str) -> float:
    bandwidth = memory_read_bandwidth(2 * GIB)
    print(f"memory bandwidth {when}: {bandwidth / 1e9:.1f} GB/s (the fastest of three reductions over 2 GiB)",
          flush=True)
    return bandwidth


def main() -> None:
    options = parse_options()
    if options.worker:
        run_worker_main(options)
        return
    with_transformers = not options.skip_transformers and transformers_available()
    if not options.skip_transformers and not with_transformers:
        print("transformers (and safetensors) are not installed: `pip install -r requirements-dev.txt` for "
              "the comparison columns; running ours and the roofline only")
    args = model_args(options.shape)
    meta_folder = ensure_meta_checkpoint(options.cache_dir, options.shape)
    hf_folder = ensure_hf_checkpoint(meta_folder, options.shape) if with_transformers else None
    checkpoint_bytes = (meta_folder / "consolidated.00.pth").stat().st_size

    machine = describe_machine()
    print_machine(machine)
    # Measured before and after the workers, best of both: a burst of load from other processes at
    # one of the two moments does not lower the roofline.
    before = measure_memory_bandwidth("before")
    reports = {dtype: run_workers(dtype, args, meta_folder, hf_folder, options) for dtype in options.dtypes}
    quantized = {scheme: run_quantized_workers(meta_folder, scheme, options) for scheme in options.quantize}
    after = measure_memory_bandwidth("after")
    best_bandwidth = max(before, after)

    results = {"shape": SHAPE_NAMES[options.shape], "params": meta_params(options.shape), "machine": machine,
               "checkpoint_bytes": checkpoint_bytes, "prompt_tokens": options.prompt_tokens,
               "new_tokens": options.new_tokens, "beam_width": BEAM_WIDTH, "repeats": options.repeats,
               "emulated_avx2_environment": AVX2_ENVIRONMENT if options.emulate_avx2 else None,
               "bandwidth_bytes_per_s": {"before": before, "after": after},
               "roofline_bandwidth_bytes_per_s": best_bandwidth,
               "dtypes": {DTYPE_NAMES[d]: summarise(d, reports[d], args, best_bandwidth, options)
                          for d in options.dtypes},
               "quantized": {scheme: summarise_quantized(scheme, runs, reports["bf16"], checkpoint_bytes, options)
                             for scheme, runs in quantized.items()}}
    print_results(results, options)
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {options.json}")


def run_quantized_workers(meta_folder: Path, scheme: str, options) -> dict:
    """Ours quantizing at load; the quantize tool writing a folder; ours loading that folder. The
    folder is written afresh (its time is one of the results) and removed afterwards."""
    print(f"\n{scheme}:")
    runs = {"at_load": run_worker("ours", meta_folder, "bf16", options, scheme)}
    if scheme not in STORED_SCHEMES:  # fp16 is packed at every load: there is no folder to write
        return runs
    folder = quantized_folder(meta_folder, scheme)
    shutil.rmtree(folder, ignore_errors=True)
    check_free_disk(folder.parent, (meta_folder / "consolidated.00.pth").stat().st_size // 2)
    runs["tool"] = run_worker("quantize_tool", meta_folder, "bf16", options, scheme)
    if "error" not in runs["tool"]:
        runs["from_folder"] = run_worker("ours", folder, "bf16", options)
        runs["folder_bytes"] = (folder / "consolidated.00.pth").stat().st_size
    shutil.rmtree(folder, ignore_errors=True)
    return runs


def run_workers(dtype: str, args: ModelArgs, meta_folder: Path, hf_folder, options) -> dict:
    reason = skip_reason(args, dtype)
    if reason:
        return {"skipped": reason}
    print(f"\n{DTYPE_NAMES[dtype]}:")
    reports = {"ours": run_worker("ours", meta_folder, dtype, options)}
    if hf_folder is not None:
        reports["transformers"] = run_worker("transformers", hf_folder, dtype, options)
        # Two copies of the weights in one process: only where they fit with room to spare.
        if 2 * ideal_memory_bytes(args, DTYPES[dtype], 0, 0) < 0.8 * meminfo_bytes("MemTotal"):
            reports["side_by_side"] = run_worker("side_by_side", meta_folder, dtype, options)
    if options.cached:
        reports["ours_cached"] = run_worker("ours_cached", meta_folder, dtype, options)
        if hf_folder is not None:
            reports["transformers_cached"] = run_worker("transformers_cached", hf_folder, dtype, options)
    return reports


def use_side_by_side_prefills(metrics: dict, side_by_side: dict, prompt_tokens: int) -> str:
    """Put the prefill rates measured in one process into `metrics`; returns the note saying so."""
    apart = ", ".join(f"{side} {fmt(metrics[side].get('prefill_tok_s'))}" for side in side_by_side["prefill_s"])
    for side, seconds in side_by_side["prefill_s"].items():
        metrics[side]["prefill_tok_s"] = prompt_tokens / seconds
    return (f"prefill: both models in one process, in turns, best of {PREFILL_REPEATS} each "
            f"(in their separate processes: {apart} tok/s)")


def summarise(dtype: str, reports: dict, args: ModelArgs, bandwidth: float, options) -> dict:
    """Everything about one dtype: raw worker reports, derived metrics, roofline, table rows, notes."""
    roofline = roofline_for(args, DTYPES[dtype], bandwidth, options.prompt_tokens, options.new_tokens, options.cached)
    if "skipped" in reports:
        return {"roofline": roofline, "rows": [], "notes": [reports["skipped"]]}
    metrics = {side: derived_metrics(report, options.prompt_tokens) for side, report in reports.items()
               if side in ("ours", "transformers")}
    for side in metrics:  # the --cached workers' decode rate joins its side's row
        metrics[side].update(derived_metrics(reports.get(f"{side}_cached", {}), options.prompt_tokens))
    notes = []
    if "prefill_s" in reports.get("side_by_side", {}):
        notes.append(use_side_by_side_prefills(metrics, reports["side_by_side"], options.prompt_tokens))
    for side, report in reports.items():
        if "error" in report:
            notes.append(f"{side} failed: {report['error']} (the numbers shown are those it reached)")
        elif "rss_baseline_mib" in report:
            notes.append(f"{side}: RSS before loading {report['rss_baseline_mib']:.0f} MiB")
        if "kernels" in report:
            notes.append(f"{side}: {kernels_note(report['kernels'])}")
        if "attention_kernels" in report:
            notes.append(f"{side}: attention at {options.cached} cached positions (products.py): "
                         f"{report['attention_kernels']}")
    if "transformers" not in reports:
        notes.append("transformers: not run")
    rows = table_rows(dtype, metrics["ours"], metrics.get("transformers", {}), roofline)
    return {"reports": reports, "metrics": metrics, "roofline": roofline, "rows": rows, "notes": notes}


def print_results(results: dict, options) -> None:
    print(f"\n{results['shape']}-shaped random checkpoint, {results['checkpoint_bytes'] / GIB:.2f} GiB (bfloat16); "
          f"prompt {options.prompt_tokens} tokens, {options.new_tokens} new tokens, {options.repeats} repeats")
    if options.emulate_avx2:
        print("EMULATED: the workers ran with " + " ".join(f"{k}={v}" for k, v in AVX2_ENVIRONMENT.items())
              + " (a CPU without bfloat16 instructions); the roofline is this machine's memory")
    for dtype_name, entry in results["dtypes"].items():
        print_table(dtype_name, entry["rows"], entry["notes"])
    for scheme, entry in results["quantized"].items():
        print_quantized_table(scheme, entry)
    print(f"\nroofline = {results['roofline_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (the best measured bandwidth) / "
          "bytes read per token (all weights but the embedding table, plus the KV cache); for memory rows: "
          f"weights in the dtype + KV cache for {BEAM_WIDTH} x {options.prompt_tokens + options.new_tokens} positions. "
          "RSS rows are net of the process's RSS before loading (interpreter and libraries).")


# Quantized (--quantize): ours with int8 or int4 matrices against ours in bfloat16, in the same run.
# Targets of the quantization issue: decode speed-up over bfloat16, and peak RSS as a share of the
# bfloat16 checkpoint file.
QUANTIZE_TARGETS = {"int8": (1.8, 0.6), "int4": (3.0, 0.4), "fp16": (None, None)}  # fp16: none of its own
QUANTIZED_ROWS = [("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s"),
                  ("beam_steps_s", "beam-4 steps/s"), ("load_s", "load s"), ("peak_rss_mib", "peak RSS MiB")]


def kernels_note(kernels: dict) -> str:
    chosen = "; ".join(f"{rows}: " + ", ".join(f"{name} x{count}" for name, count in names.items())
                       for rows, names in kernels.items())
    return f"kernels chosen per weight shape (products.py): {chosen}"


def summarise_quantized(scheme: str, runs: dict, bfloat16_reports: dict, checkpoint_bytes: int, options) -> dict:
    """Rows of: quantized at load, loaded from the tool's folder, our bfloat16, and the ratio to
    bfloat16 with the issue's targets (judged on the folder's run where there is one); notes with
    the ratios to transformers' bfloat16, where it ran."""
    at_load = derived_metrics(runs["at_load"], options.prompt_tokens)
    from_folder = derived_metrics(runs.get("from_folder", {}), options.prompt_tokens)
    best = from_folder or at_load
    bfloat16 = derived_metrics(bfloat16_reports["ours"], options.prompt_tokens)
    speed_target, memory_target = QUANTIZE_TARGETS[scheme]
    rows = []
    for key, label in QUANTIZED_ROWS:
        mine = best.get(key)
        other = bfloat16.get(key)
        ratio = mine / other if mine is not None and other else None
        target = ""
        if key == "decode_tok_s" and ratio is not None and speed_target:
            target = f">={speed_target}x bf16: {VERDICTS[ratio >= speed_target]}"
        if key == "peak_rss_mib" and mine is not None and memory_target:
            share = mine * MIB / checkpoint_bytes
            target = f"{share:.3f} of the bf16 file, <={memory_target}: {VERDICTS[share <= memory_target]}"
        rows.append((label, fmt(at_load.get(key)), fmt(from_folder.get(key)), fmt(other), fmt(ratio), target))
    notes = [f"ours {scheme} {run} failed: {runs[run]['error']}" for run in ("at_load", "tool", "from_folder")
             if "error" in runs.get(run, {})]
    tool = runs.get("tool", {})
    if "tool_s" in tool:
        notes.append(f"python -m llama_models.quantize wrote {runs['folder_bytes'] / GIB:.2f} GiB in {tool['tool_s']:.1f} s, "
                     f"peak RSS {tool['peak_rss_mib'] - tool['rss_baseline_mib']:.0f} MiB above the interpreter")
    transformers = derived_metrics(bfloat16_reports.get("transformers", {}), options.prompt_tokens)
    if transformers.get("decode_tok_s") and best.get("decode_tok_s"):
        notes.append(f"against transformers in bfloat16: decode {best['decode_tok_s'] / transformers['decode_tok_s']:.2f}x, "
                     f"prefill {best['prefill_tok_s'] / transformers['prefill_tok_s']:.2f}x")
    if best.get("beam_step_vs_greedy"):
        notes.append(f"a beam-4 step costs {best['beam_step_vs_greedy']:.2f}x a greedy step")
    kernels = runs.get("from_folder", runs["at_load"]).get("kernels")
    if kernels:
        notes.append(f"ours {scheme}: {kernels_note(kernels)}")
    return {"runs": runs, "metrics": best, "rows": rows, "notes": notes}


def print_quantized_table(scheme: str, entry: dict) -> None:
    header = ("metric", f"{scheme} at load", f"{scheme} folder", "ours bfloat16", f"{scheme}/bf16", "target")
    print_table(f"{scheme}: quantized at load, and loaded from the quantize tool's folder", entry["rows"],
                entry["notes"], header)


if __name__ == "__main__":
    main()
