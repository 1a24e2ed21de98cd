"""Run a Llama 3.x checkpoint and watch every step: text -> tokens -> logits -> tokens -> text.

    python run_inference.py                       # edit the settings below first
    torchrun --nproc-per-node 8 run_inference.py  # a checkpoint with 8 shards (70B), one per process

The settings at the top are the whole interface. The file then reads top to bottom in chapters, the
same stages as minimal_run_inference.py, with the explanations that one leaves out:

    1. Settings                      6. Load the weights
    2. Start torch.distributed       6b. Quantize the weights: int8, int4, fp16
    3. Read params.json              7. Decode: greedy, beam search, sampling (prefill + KV cache)
    4. Tokenize the prompt           7b. Chat: a conversation that keeps its KV cache
    5. Build the Transformer         7c. Looking inside: alternatives, logit lens, memory, attention,
                                         where a decode step's time goes
                                     8. Report, and main()
"""

import base64
import contextlib
import dataclasses
import difflib
import importlib.util
import itertools
import math
import os
import re
import signal
import sys
import time
import types
import unicodedata
from pathlib import Path


def exit_interrupted(*_) -> None:
    """Ctrl-C: end with exit code 130, as shells report a process ended by SIGINT, and no traceback.
    Under torchrun every process gets it, and rank 0 alone says so."""
    if torchrun_rank() == 0:
        print("\ninterrupted", file=sys.stderr)
    sys.exit(130)


def exit_with_error(error: Exception) -> None:
    """One line and exit code 1. Under torchrun each process says its own, other ranks than 0 with
    their number: most errors are the same in every process, but a damaged shard is met only by
    the process that reads it, and a missing folder only on the machine that lacks it."""
    rank = torchrun_rank()
    # One write (sys.exit's message and its newline are two): two processes' lines cannot run together.
    sys.stderr.write(("" if rank == 0 else f"[rank {rank}] ") + f"error: {error}\n")
    sys.exit(1)


def torchrun_rank() -> int:  # torchrun's RANK variable: the error may come before torch.distributed starts
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isascii() and rank.isdigit() else 0  # init_model_parallel refuses one that is not


if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) ends quietly; main() restores it
    signal.signal(signal.SIGINT, exit_interrupted)

import torch  # noqa: E402  (after the handler above)
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:  # Meta's downloader package has our package's name: if it replaced ours, say so
    from llama_models.llama3 import ChatFormat, LlamaError, ModelArgs, StreamingDecoder, Tokenizer, products
    from llama_models.llama3.args import is_finite_number, is_whole_number
    from llama_models.llama3.bandwidth import memory_read_bandwidth
    from llama_models.llama3.checkpoint import (CheckpointFiles, build_model, check_quantize_request, checkpoint_folder,
                                                find_checkpoint_files, load_tokenizer, load_weights, quantize_loaded)
    from llama_models.llama3.devices import resolve_device, resolve_dtype, synchronize
    from llama_models.llama3.model import ColumnParallelLinear, RowParallelLinear, apply_rope
    from llama_models.llama3.parallel import end_model_parallel, init_model_parallel, is_main_process
    from llama_models.llama3.quantize import SCHEMES, QuantizedWeight, listed
    from llama_models.llama3.tokenizer import printable
except ImportError as error:
    sys.exit(f"error: cannot import this project's llama_models ({error}). Meta's llama-models package, which "
             "holds its downloader, has the same name and replaces ours: run `pip install -r requirements.txt` "
             "here, and keep Meta's downloader in an environment of its own (README.md, Set up)")

# ================================================================================================
# 1. Settings
# ================================================================================================

MODEL_NAME = "Llama3.2-1B-Instruct"  # a folder under LLAMA_MODELS_DIR, as `llama-model download` names it
LLAMA_MODELS_DIR = "~/.llama/checkpoints"  # where Meta's downloader puts checkpoints
# The environment variable LLAMA_CHECKPOINT_DIR, when set, names the checkpoint folder directly.
INPUT_STRING = "Explain in two sentences why the sky is blue."
SYSTEM_PROMPT = None  # instruct models only: e.g. "You are a concise assistant." (None: no system message)
IS_INSTRUCT = None  # None: an instruct model if "Instruct" is in the model's folder name; True/False to override

DEVICE = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1" or "mps"
DTYPE = None  # None: bfloat16 where the device has it, else float16; or "float32", "bfloat16", "float16"
QUANTIZE = None  # None; "int8" or "int4": the matrices in 8 or 4 bits; "fp16": packed for fbgemm (chapter 6b)

DECODING = "greedy"  # "greedy", "beam" or "sample"
MAX_NEW_TOKENS = 128  # stop after this many generated tokens, if no stop token came first
BEAM_WIDTH = 4  # beam search: hypotheses kept at each step
LENGTH_PENALTY = 1.0  # beam search: score = log-probability / length**LENGTH_PENALTY
TEMPERATURE = 0.6  # sampling: below 1 sharpens the distribution, above 1 flattens it (Meta's default)
TOP_P = 0.9  # sampling: draw only from the smallest set of tokens holding this much probability
SEED = 1  # sampling: the same seed draws the same numbers (the text can still differ: README, Run a model)

SHOW_TOKENS = False  # greedy/sample: a table of generated tokens (id, probability, text) instead of text

CHAT = False  # True: a conversation with an instruct model on standard input (chapter 7b); INPUT_STRING unused
CHAT_CONTEXT = 4096  # chat: tokens the dialog may hold (its KV cache); at most the model's trained context

# Looking inside the model (chapter 7c). Each is off by default.
SHOW_PROMPT_TOKENS = False  # every prompt token: id, its bytes as stored in tokenizer.model (base64), text
SHOW_ALTERNATIVES = 0  # greedy/sample: per generated token the N likeliest candidates and the entropy
SHOW_LOGIT_LENS = False  # the model's best guess for the next token after each layer
SHOW_MEMORY = False  # bytes of the weights by part, of the KV cache and what sizes it, and peak memory
ATTENTION_PNG = None  # e.g. "attention.png": the last layer's attention over the prompt (needs matplotlib)
SHOW_PROFILE = False  # where a decode step's time goes: each part's ms, bytes read, GB/s, and its kernels


# Each setting's kind, checked before anything runs, so that a typo ends in one line naming it
# (MAX_NEW_TOKENS = "10" would otherwise fail deep inside, and IS_INSTRUCT = "no" would count as yes).
# SEED's range is what torch.manual_seed takes (with room for the chat's SEED + turn).
WHOLE_NUMBER_SETTINGS = {"MAX_NEW_TOKENS": (1, None), "BEAM_WIDTH": (1, None), "SHOW_ALTERNATIVES": (0, None),
                         "SEED": (-2**63, 2**63 - 1), "CHAT_CONTEXT": (2, None)}  # ranges
# LENGTH_PENALTY's range keeps length**LENGTH_PENALTY a finite, non-zero float at any length the
# context holds (131072**10 is about 1e51); useful values lie between 0 and 2.
NUMBER_SETTINGS = {"LENGTH_PENALTY": (-10, 10), "TEMPERATURE": (0, None), "TOP_P": (0, 1)}  # ranges
SWITCH_SETTINGS = ("CHAT", "SHOW_TOKENS", "SHOW_PROMPT_TOKENS", "SHOW_LOGIT_LENS", "SHOW_MEMORY", "SHOW_PROFILE")
TEXT_SETTINGS = {"MODEL_NAME": False, "LLAMA_MODELS_DIR": False, "INPUT_STRING": False, "SYSTEM_PROMPT": True,
                 "ATTENTION_PNG": True, "DEVICE": False, "DTYPE": True}  # may it be None?
SETTINGS = (*WHOLE_NUMBER_SETTINGS, *NUMBER_SETTINGS, *SWITCH_SETTINGS, "IS_INSTRUCT", *TEXT_SETTINGS, "DECODING",
            "QUANTIZE")  # (the last three are checked by value)


def check_settings() -> None:
    check_setting_names()
    settings = globals()
    for name, (low, high) in WHOLE_NUMBER_SETTINGS.items():
        value = settings[name]
        if not is_whole_number(value):
            hint = " (0 turns it off)" if name == "SHOW_ALTERNATIVES" else ""
            raise LlamaError(f"{name} = {value!r}: write a whole number, e.g. {name} = 5{hint}")
        check_range(name, value, low, high)
    for name, (low, high) in NUMBER_SETTINGS.items():
        value = settings[name]
        if not is_finite_number(value):
            raise LlamaError(f"{name} = {value!r}: write a finite number, e.g. {name} = 0.9")
        check_range(name, value, low, high)
    for name in SWITCH_SETTINGS + ("IS_INSTRUCT",):
        value = settings[name]
        if not isinstance(value, bool) and not (name == "IS_INSTRUCT" and value is None):
            or_none = " (or None)" if name == "IS_INSTRUCT" else ""
            raise LlamaError(f"{name} = {value!r}: write True or False{or_none}")
    for name, may_be_none in TEXT_SETTINGS.items():
        value = settings[name]
        if not isinstance(value, str) and not (may_be_none and value is None):
            raise LlamaError(f"{name} = {value!r}: write text in quotes" + (" (or None)" if may_be_none else ""))
    if DECODING not in ("greedy", "beam", "sample"):
        raise LlamaError(f"DECODING = {DECODING!r}: use 'greedy', 'beam' or 'sample'")
    if QUANTIZE not in (None, *SCHEMES):
        raise LlamaError(f"QUANTIZE = {QUANTIZE!r}: use None, {listed(SCHEMES)}")
    if ATTENTION_PNG is not None:  # now, not after the model has loaded and answered
        check_attention_png(Path(ATTENTION_PNG).expanduser())


def check_setting_names() -> None:
    """Every setting is there, under its own name: a renamed line would otherwise end in a NameError,
    and a misspelled one (DECODNG = "beam" beside DECODING) would be ignored."""
    settings = globals()
    for name, value in settings.items():
        if name in SETTINGS or name.startswith("_") or callable(value) or isinstance(value, types.ModuleType):
            continue
        if name == "LLAMA_CHECKPOINT_DIR":
            raise LlamaError("LLAMA_CHECKPOINT_DIR is an environment variable, not a setting: run "
                             f"`LLAMA_CHECKPOINT_DIR=... python {Path(__file__).name}`, or set MODEL_NAME and LLAMA_MODELS_DIR")
        # A name of the user's own that extends a setting's (INPUT_STRING_2) is no slip; the script's
        # own constants are all further from every setting than the cutoff.
        meant = difflib.get_close_matches(name.upper(), SETTINGS, n=1, cutoff=0.8)
        if meant and not name.startswith(meant[0]):
            raise LlamaError(f"{name} is not a setting (did you mean {meant[0]}?): correct its name")
    missing = [name for name in SETTINGS if name not in settings]
    if missing:
        raise LlamaError(f"the setting {missing[0]} is missing from chapter 1 of {Path(__file__).name}: write its "
                         "line back (git diff shows what changed)")


def check_range(name: str, value, low, high) -> None:  # high None: no upper bound
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise LlamaError(f"{name} = {value}: it must be {bounds}")


def check_attention_png(path: Path) -> None:
    if path.suffix.lower() != ".png" or path.is_dir():  # matplotlib would add .png, or choose by the suffix
        raise LlamaError(f"ATTENTION_PNG = {ATTENTION_PNG!r}: name a file ending in .png (or None: no picture)")
    if not path.parent.is_dir():
        raise LlamaError(f"ATTENTION_PNG = {ATTENTION_PNG!r}: the folder {path.parent} does not exist; create it "
                         "or name a file in one that does")
    target = path if path.exists() else path.parent  # a file to overwrite, or the folder to write it in
    if not os.access(target, os.W_OK):
        raise LlamaError(f"ATTENTION_PNG = {ATTENTION_PNG!r}: this user may not write to {target}; name a file "
                         "in a folder of yours")
    if not matplotlib_installed():
        raise LlamaError(f"ATTENTION_PNG = {ATTENTION_PNG!r} draws with matplotlib, which is not installed: "
                         "pip install matplotlib, or set ATTENTION_PNG = None")


def matplotlib_installed() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def unused_settings(instruct: bool, trained_context: int) -> list:
    """Settings turned on or given that the others leave without effect: a note each. (The numbers of
    the decoding methods not chosen, such as TEMPERATURE with greedy decoding, always have values, so
    they get none.)"""
    settings, notes = globals(), []
    if DECODING == "beam" and not CHAT:
        notes += [f"{name} = {settings[name]!r} shows greedy or sampled tokens; beam search prints whole beams"
                  for name in ("SHOW_TOKENS", "SHOW_ALTERNATIVES") if settings[name]]
    if CHAT:
        notes += [f"{name} = {settings[name]!r} looks at INPUT_STRING's prompt, which a chat does not use"
                  for name in ("SHOW_PROMPT_TOKENS", "SHOW_LOGIT_LENS", "ATTENTION_PNG") if settings[name]]
        if CHAT_CONTEXT > trained_context:
            notes.append(f"CHAT_CONTEXT = {CHAT_CONTEXT} is more than the model was trained on: the chat holds "
                         f"{trained_context} tokens")
    if SYSTEM_PROMPT is not None and not instruct and not CHAT:  # a chat refuses such a model anyway
        notes.append(f"SYSTEM_PROMPT = {SYSTEM_PROMPT!r} is for instruct models; this one reads INPUT_STRING as "
                     "plain text (IS_INSTRUCT = True to use the chat format)")
    return notes

# ================================================================================================
# 2. Start torch.distributed and fairscale
# ================================================================================================
# The model's linear layers come from fairscale's model-parallel package. Llama 3.x 70B is 141 GB in
# bfloat16: no single GPU holds it, so `torchrun --nproc-per-node N` starts N processes (one per GPU,
# on one machine or several) and each keeps 1/N of every large matrix. How a matrix is cut follows
# from how it is used. Column-parallel layers (wq, wk, wv, w1, w3, output) are cut by rows, that is by
# outputs: each process computes its own attention heads, feed-forward hidden units and vocabulary
# scores without talking to the others. Row-parallel layers (wo, w2) are cut by columns, that is by
# inputs: each process multiplies exactly the heads or hidden units it has just computed, and one
# all-reduce adds the N partial results into the full vector. So a block costs two all-reduces, and
# the output layer one all-gather of the vocabulary scores. The embedding is cut by vocabulary rows
# (each process looks up the ids it owns, the others add zeros); the RMSNorm weights are tiny and
# every process keeps them whole. A head is the unit of attention, so a process holds whole heads:
# with more processes than the 8 key/value heads, each KV head is repeated. Meta saves one shard per
# process (70B: 8 files); `load_weights` also cuts or glues shards when N differs (sharding.py).
# Every process ends with the same logits, so all pick the same next token; only rank 0 prints.
#
# Even with a single process the layers ask "which process am I, out of how many?", so a process
# group must exist: `init_model_parallel` creates a group of one when the script is started with
# plain `python`, and joins torchrun's group otherwise.


def start_processes(device: torch.device) -> tuple[torch.device, bool]:
    """This process's device (under torchrun, "cuda" means its own GPU), and whether it prints (rank 0)."""
    device = init_model_parallel(device)
    return device, is_main_process()


# ================================================================================================
# 3. Read params.json
# ================================================================================================
# params.json holds the model's shape, e.g. Llama 3.2 1B: {"dim": 2048, "n_layers": 16, "n_heads": 32,
# "n_kv_heads": 8, "vocab_size": 128256, "ffn_dim_multiplier": 1.5, "multiple_of": 256,
# "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": true}. It says nothing about how long
# a text may get: that is our choice (max_seq_len), made once the prompt is known (chapter 5).


def is_instruct(files: CheckpointFiles) -> bool:
    return IS_INSTRUCT if IS_INSTRUCT is not None else files.named_instruct


# ================================================================================================
# 4. Tokenize the prompt
# ================================================================================================
# The model reads integers. tokenizer.model lists 128,000 byte strings, one per line, as base64 and a
# rank: "IQ== 0" is b"!" with id 0, "IGhlbGxv 24748" is b" hello" (with its leading space) with id
# 24748. Byte-pair encoding cuts text into the longest such pieces. After the 128,000 come 256 special
# tokens that no text produces, only code: <|begin_of_text|> starts every prompt; an instruct model
# sees each chat message as <|start_header_id|>role<|end_header_id|>\n\ntext<|eot_id|>, and answers
# after an empty assistant header, ending its turn with <|eot_id|> (end of turn).


def encode_prompt(tokenizer: Tokenizer, text: str, instruct: bool) -> list:
    if not text.strip():
        raise LlamaError("INPUT_STRING is empty: write a prompt at the top of the script")
    if not instruct:  # a base model simply continues the text
        return tokenizer.encode(text, bos=True, eos=False)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if SYSTEM_PROMPT else []
    messages.append({"role": "user", "content": text})
    return ChatFormat(tokenizer).encode_dialog_prompt(messages)


def show_tokenizer_file(tokenizer_path: Path, n_lines: int = 3) -> None:
    """Print the first lines of tokenizer.model with the bytes their base64 stands for."""
    print(f"{tokenizer_path.name} holds lines of '<base64 of the token's bytes> <rank = token id>':")
    with open(tokenizer_path) as file:
        for line, _ in zip(file, range(n_lines)):
            encoded, rank = line.split()
            print(f"    {line.strip():<24} -> id {rank:>6} = {base64.b64decode(encoded)!r}")


def percent(probability: float) -> str:
    """A probability to two decimals; "<0.01%" where that would read 0.00% yet is not 0 (a drawn
    token, a random model's best guess)."""
    return "<0.01%" if 0 < probability < 0.00005 else f"{probability:.2%}"


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as text, or as raw bytes when it holds only part of a multi-byte character."""
    raw = tokenizer.token_bytes(token)
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def stored_form(tokenizer: Tokenizer, token: int) -> str:
    """How a token appears in tokenizer.model: its bytes in base64. Special tokens are not in the file."""
    if token >= tokenizer.n_base_tokens:
        return "(special)"
    return base64.b64encode(tokenizer.token_bytes(token)).decode("ascii")


def show_prompt_tokens(tokenizer: Tokenizer, prompt: list) -> None:
    print(f"{'position':>8}  {'id':>6}  {'base64':<12}  token")
    for position, token in enumerate(prompt):
        print(f"{position:>8}  {token:>6}  {stored_form(tokenizer, token):<12}  {token_text(tokenizer, token)}")
    print()


# ================================================================================================
# 5. Build the Transformer
# ================================================================================================
# max_seq_len and max_batch_size size the KV cache (chapter 7): every layer keeps, for every sequence
# and position, a key and a value vector per key/value head. We size it for this prompt plus the
# answer, not a round default: the scripts this project grew from kept Meta's ModelArgs defaults, 32
# sequences x 2048 positions (4 GiB for 1B in float32), GPU memory from the start on MPS or CUDA.


def model_args_for(params: ModelArgs, prompt_length: int, batch_size: int) -> ModelArgs:
    context = params.trained_context
    if prompt_length >= context:
        raise LlamaError(
            f"the prompt is {prompt_length} tokens but the model's context is {context}: shorten INPUT_STRING"
        )
    max_seq_len = min(prompt_length + MAX_NEW_TOKENS, context)
    return dataclasses.replace(params, max_seq_len=max_seq_len, max_batch_size=batch_size)


# ================================================================================================
# 6. Load the weights
# ================================================================================================
# consolidated.00.pth is a dict of bfloat16 tensors named like the model's modules
# ("layers.0.attention.wq.weight"). `load_weights` memory-maps it and hands those very tensors to the
# model (load_state_dict(assign=True)), so on the CPU in bfloat16 the weights are pages of the file,
# read from disk when first used, and never copied. (A float32 or GPU load copies each tensor and
# gives its pages of the file back.) See llama_models/llama3/checkpoint.py.


# ================================================================================================
# 6b. Quantize the weights (QUANTIZE = "int8", "int4" or "fp16")
# ================================================================================================
# A decode step reads every weight once, so it takes at least as long as the memory needs to deliver
# them: bytes per weight set the limit on its speed. bfloat16 stores 2 bytes a weight. int8 stores
# 1, plus one scale per row of 2048 or more: w ~ q * scale with q a whole number from -127 to 127. int4 stores
# half a byte, plus a scale and a zero point per group of 32 inputs (2 x 2 bytes / 32 = 1/8 byte
# more): w ~ (q - 8) * scale + zero with q from 0 to 15. Llama 3.2 1B's 2.5 GB become 1.3 GB or 0.8 GB,
# and 8B's 15 GB become 8 or 5: 8B then fits a 16 GB laptop.
#
# The price is rounding. Each weight moves by up to half a step: int8's step is 1/127 of the row's
# largest weight, int4's 1/15 of its group's range, so int4 moves the model's answers visibly more.
# The activations stay in bfloat16 (or float32) and every sum is added in float32, as before.
#
# Why decoding gets faster and a prompt may not: PyTorch's int8 and int4 kernels read the small
# numbers and convert each to the activations' dtype as they multiply. For one row (a decode step)
# that conversion is done once per weight read, so fewer bytes win as long as the CPU converts
# faster than the memory delivers; where it does not, the arithmetic sets the pace (README, "Speed
# and memory, measured", has a CPU where int4 decodes slower than int8). For a prompt of many rows every
# weight is used many times, the conversion is repeated for each, and the time is arithmetic: there
# converting an int8 matrix back once ("dequantized", for the length of one product, whole or a
# block of rows at a time) can be faster.
# products.py times the candidates on the first products of each kind and keeps the fastest.
#
# llama_models/llama3/quantize.py quantizes each matrix as it is loaded, frees the bfloat16 original,
# and keeps the embedding and the output layer one matrix where Llama 3.2 shares them. Quantizing
# takes time at every start (README's tables say how long on the CPUs measured), so it can be done
# once instead:
#     python -m llama_models.quantize ~/.llama/checkpoints/Llama3.1-8B-Instruct ~/.llama/checkpoints/Llama3.1-8B-Instruct-int4 int4
# writes a folder whose params.json names the scheme; point MODEL_NAME at it, and its matrices are
# memory-mapped as they lie in the file (QUANTIZE = None, or the folder's own scheme; others are refused).
# int4's CPU kernel wants the codes in a layout of its own, which depends on the CPU: that layout is
# made while loading, from the portable one in the file. On CUDA and MPS, PyTorch's own int4 and
# int8 kernels take the matrices where this PyTorch has them for the device (products.py tries
# each once on a small matrix first); elsewhere each matrix is dequantized for its product.
#
# "fp16" rounds nothing away: float16 holds every bfloat16 weight of a Llama exactly (its 11
# significant bits include bfloat16's 8) unless it is below 6e-5 in magnitude, and those move by
# less than 6e-8. It is about speed on CPUs without bfloat16 arithmetic, where every bfloat16
# kernel converts each weight as it multiplies. PyTorch's fbgemm library has a half-precision product
# for one row, four (beams) or a prompt's worth, once each matrix is packed in its own layout (README's
# tables have a CPU where it reads the memory faster than any bfloat16 kernel). That packing is done
# at every load, in seconds for Llama 3.2 1B, and cannot be saved, so whether it pays off depends on
# the CPU and on how many tokens follow: benchmarks/bench.py --quantize fp16 measures both sides.
# The embedding is not packed: a lookup reads a few of its rows. products.py still times fbgemm's
# product against the others and keeps the fastest, as for every kind of weight.


def how_quantized_matrices_multiply(model, scheme: str, device, dtype) -> str:
    """A line for off the CPU: PyTorch's built-in kernel for the scheme (products.py tries it once
    on a small matrix), or each matrix dequantized for its product."""
    if not products.built_in_kernel_serves(model.layers[0].attention.wq.weight, dtype):
        return (f"(on {device.type} the {scheme} matrices are dequantized for every product, as this PyTorch has no "
                f"{scheme} kernel for {dtype} there: less memory, but more work per product than bfloat16)")
    fallback = ", or dequantized where that is faster" if scheme == "int8" else ""  # int4 lets go of its codes
    return f"(on {device.type} the {scheme} matrices are multiplied by PyTorch's {scheme} kernel{fallback})"


def quantizing_progress(scheme: str, is_main: bool):
    """progress(done, total) for quantize(): a line that counts up on a terminal; only its end in a file."""
    started = time.perf_counter()
    what = "packing for fbgemm's fp16 product:" if scheme == "fp16" else f"quantizing to {scheme}:"

    def show(done: int, total: int) -> None:
        if is_main and (done == total or (sys.stdout.isatty() and done % max(1, total // 20) == 0)):
            print(f"\r{what} {done}/{total} matrices, {time.perf_counter() - started:.1f} s",
                  end="\n" if done == total else "", flush=True)

    return show


# ================================================================================================
# 7. Decode
# ================================================================================================
# The model maps tokens (batch, seq) to logits (batch, seq, vocab): for every position, a score for
# every possible next token. Generation is a loop: pick a next token from the last position's
# logits, append it, repeat.
#
# Prefill and the KV cache: attention at position t needs the keys and values of all earlier
# positions. Those never change, so each layer caches them. The first call (prefill) runs the whole
# prompt at once with start_pos=0 and fills the cache; every later call feeds only the one new token
# with start_pos = its position, and attends to the cache. Each step then costs the same, instead of
# growing with the text. The mask: during prefill, position i must not see positions after i (they
# are the future it is predicting); a single new token has no future in the cache, so it needs none.
#
# Softmax turns logits into probabilities. It is taken in float32, the dtype `Transformer.logits`
# returns whatever the weights' dtype: in bfloat16 (3 significant digits) small probabilities round
# to 0 and large ones lose the differences that separate the top candidates.


def prompt_tensor(model, tokens: list) -> torch.Tensor:
    return torch.tensor([tokens], device=model.output.weight.device)  # (1, seq)


# Long prompts are prefilled in chunks. Where scaled_dot_product_attention has no fused kernel for
# the device, it holds the attention scores of `seq` new tokens against `kv_len` cached ones,
# n_heads x seq x kv_len numbers: 4 GiB for an 8k-token prompt in one call. 512 tokens at a time keep
# them small, and thanks to the KV cache the result is the same as one call. On the CPU the fused
# kernel works in blocks of query rows either way, so the chunks change how its work is cut, not
# how much there is.
PREFILL_CHUNK = 512


def prefill(model, prompt_tokens: list, cached: int = 0) -> torch.Tensor:
    """Run the prompt through the model, filling the KV cache; return the last position's logits.   # (1, vocab)

    model(tokens) would score the vocabulary at every prompt position; only the last one predicts
    the next token, so the layers run on the whole prompt and the output layer on that position.
    `cached`: how many of the prompt's first tokens the KV cache already holds (a chat's earlier
    turns, chapter 7b); the prefill starts after them.
    """
    if not isinstance(prompt_tokens, list) or not prompt_tokens or not all(map(is_whole_number, prompt_tokens)):
        raise LlamaError(f"the prompt must be a list of at least one token id (ints), not {prompt_tokens!r:.60}")
    if not 0 <= cached < len(prompt_tokens):
        raise ValueError(f"cached={cached} must leave at least one of the {len(prompt_tokens)} prompt tokens to run")
    for start in range(cached, len(prompt_tokens), PREFILL_CHUNK):
        chunk = prompt_tensor(model, prompt_tokens[start : start + PREFILL_CHUNK])
        hidden = model.hidden_states(chunk, start_pos=start)  # (1, chunk length, dim)
    logits = model.logits(hidden[:, -1:])[:, -1]
    if not logits.isfinite().all():  # once per prompt: else every token after it would be nonsense, silently
        raise LlamaError("the model's scores for the prompt are NaN or infinite: the checkpoint's weights hold such "
                         "numbers (download them again), or float16 overflowed (try DTYPE = 'bfloat16' or 'float32')")
    return logits


def decode_one_token(model, tokens: torch.Tensor, position: int) -> torch.Tensor:
    """One decode step: each sequence's newest token, tokens (batch, 1), goes in at `position` and
    attends to the KV cache before it; returns the scores for the token after it.   # (batch, vocab)"""
    return model(tokens, start_pos=position)[:, -1]


def decode_loop(model, prompt_tokens: list, max_new_tokens: int, stop_tokens, choose, cached: int):
    """The generation loop of greedy decoding and sampling; `choose(logits)` picks the next token.

    Yields (token, probability) pairs and stops before a stop token, or after max_new_tokens.
    """
    logits = prefill(model, prompt_tokens, cached)[0]  # (vocab,)
    position = len(prompt_tokens)  # where the next token goes in the KV cache
    for step in range(max_new_tokens):
        token, probability = choose(logits)
        if token in stop_tokens:
            return
        yield token, probability
        if step + 1 < max_new_tokens:  # one more token is wanted: run the model on this one
            logits = decode_one_token(model, prompt_tensor(model, [token]), position)[0]  # (vocab,)
            position += 1


def most_likely(logits: torch.Tensor) -> tuple:
    probs = torch.softmax(logits, dim=-1)  # (vocab,)
    token = int(probs.argmax())
    return token, float(probs[token])


def greedy_decode(model, prompt_tokens: list, max_new_tokens: int, stop_tokens=frozenset(), cached: int = 0):
    """Yield (token, probability) pairs, always taking the most likely next token."""
    return decode_loop(model, prompt_tokens, max_new_tokens, stop_tokens, most_likely, cached)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the most likely tokens whose probabilities add up to top_p, and renormalise.

    Sorted from most to least likely, a token is kept if the tokens before it hold at most top_p,
    so the token that crosses top_p is kept and the most likely token always is.
    Example: [0.5, 0.3, 0.15, 0.05] with top_p 0.9 keeps the first three.
    """
    if top_p >= 1:  # keep everything (the float32 running sum can exceed 1.0 and cut the tail)
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)  # (vocab,)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before > top_p] = 0.0
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum()


def sample(model, prompt_tokens: list, max_new_tokens: int, stop_tokens, temperature: float, top_p: float,
           seed: int, cached: int = 0):
    """Yield (token, probability) pairs drawn at random from the temperature-scaled, top-p-cut
    distribution; the probability is the token's in that distribution. Under torchrun every process
    uses the same seed and sees the same logits, so all draw the same tokens."""
    if not (is_finite_number(temperature) and temperature >= 0 and is_finite_number(top_p) and 0 <= top_p <= 1):
        raise LlamaError(f"temperature={temperature!r}, top_p={top_p!r}: the temperature must be a number of 0 or "
                         "more, top_p one between 0 and 1")
    if not (is_whole_number(seed) and -2**63 <= seed < 2**64):  # what torch.Generator.manual_seed takes
        raise LlamaError(f"seed={seed!r}: it must be a whole number from -2**63 to 2**64 - 1")
    if temperature <= 0:  # no randomness left: the most likely token every time, drawn with probability 1
        return ((token, 1.0) for token, _ in greedy_decode(model, prompt_tokens, max_new_tokens, stop_tokens, cached))
    generator = torch.Generator(device=model.output.weight.device).manual_seed(seed)

    def draw(logits: torch.Tensor) -> tuple:
        # Less the largest score (softmax is the same for any shift), and by a temperature float32
        # can hold (1e-300 would round to 0): a tiny temperature then takes the other scores to -inf,
        # probability 0, where they would overflow to inf, or the top one be 0 / 0. (Not float64:
        # MPS has none.)
        scaled = (logits - logits.max()) / max(temperature, torch.finfo(logits.dtype).tiny)  # (vocab,)
        probs = top_p_filter(torch.softmax(scaled, dim=-1), top_p)
        token = int(torch.multinomial(probs, num_samples=1, generator=generator))
        return token, float(probs[token])

    return decode_loop(model, prompt_tokens, max_new_tokens, stop_tokens, draw, cached)


def decode_steps(model, prompt_tokens: list, max_new_tokens: int, stop_tokens, seed: int = None, cached: int = 0):
    """Greedy decoding or sampling, as DECODING says, with the settings' temperature, top-p and seed."""
    if DECODING == "greedy":
        return greedy_decode(model, prompt_tokens, max_new_tokens, stop_tokens, cached)
    return sample(model, prompt_tokens, max_new_tokens, stop_tokens, TEMPERATURE, TOP_P,
                  SEED if seed is None else seed, cached)


# Beam search keeps the BEAM_WIDTH best partial answers ("beams") instead of one, and at each step
# extends all of them by every possible token and keeps the best BEAM_WIDTH of the results, ranked by
# total log-probability. All beams advance together as one batch: row b of the batch (and of every
# layer's KV cache) is beam b, so one forward pass, one read of the weights, serves every beam.
# When the survivors descend from other beams than the rows they occupy, the cache rows are
# reordered to match. A beam that ends in a stop token leaves the batch as a finished hypothesis,
# scored log-probability / length**length_penalty so long answers are not punished for being long;
# the search ends when BEAM_WIDTH hypotheses have finished (or at max_new_tokens).
#
# (The scripts this project grew from called "beam search" BEAM_WIDTH separate greedy runs started
# from the BEAM_WIDTH most likely first tokens. That explores only the first step: the runs never
# compare with each other again, so a beam cannot be dropped for a better one.)
#
# The rules follow Hugging Face transformers' generate(num_beams=k, do_sample=False,
# early_stopping=True), and the tests check that both give the same hypotheses.


def reorder_kv_cache(model, parent_rows: torch.Tensor, length: int) -> None:
    """Row b of every layer's cache becomes a copy of row parent_rows[b] (first `length` positions)."""
    # Only rows whose parent is another row change, so only those are copied: copying every row
    # would move the whole cache, every beam's every position, at every step.
    rows = torch.arange(len(parent_rows), device=parent_rows.device)  # (beams,)
    moved = rows[parent_rows != rows]  # (changed rows,): the rows that take another row's cache
    sources = parent_rows[moved]  # (changed rows,): the row each copies
    for layer in model.layers:
        for cache in (layer.attention.cache_k, layer.attention.cache_v):
            filled = cache[:, :, :length]  # (max_batch_size, kv_heads, length, head_dim)
            # index_select copies the sources out first, so a row may be a source and a destination.
            filled.index_copy_(0, moved, filled.index_select(0, sources))


def beam_search(model, prompt_tokens: list, beam_width: int, max_new_tokens: int, stop_tokens,
                length_penalty: float) -> list:
    """Return up to beam_width (tokens, score) pairs, best first. `tokens` are the generated ids
    (ending with the stop token if the hypothesis finished); score = sum of log-probabilities /
    len(tokens)**length_penalty. The model must be built with max_batch_size >= beam_width."""
    if not 1 <= beam_width <= model.args.max_batch_size:  # each beam is a sequence of the KV cache
        raise LlamaError(f"beam_width={beam_width}: it must be between 1 and the model's max_batch_size, "
                         f"{model.args.max_batch_size} (load_llama(..., max_batch_size=...))")
    logits = prefill(model, prompt_tokens)  # (1 beam, vocab)
    vocab_size = logits.shape[-1]
    beam_scores = torch.zeros(1, device=logits.device)  # (beams,) summed log-probabilities
    beam_tokens = [[]]  # the tokens each live beam has generated
    finished = []  # (score, tokens), best first, at most beam_width
    # Enough candidates that, even if every stop token is among them, beam_width remain to go on.
    n_candidates = max(2, 1 + len(stop_tokens)) * beam_width

    for length in range(1, max_new_tokens + 1):
        log_probs = F.log_softmax(logits, dim=-1)  # (beams, vocab)
        totals = (beam_scores[:, None] + log_probs).flatten()  # (beams * vocab,)
        top_totals, top_index = totals.topk(min(n_candidates, totals.numel()))  # (candidates,), best first
        parents, tokens = top_index // vocab_size, top_index % vocab_size  # (candidates,): which beam, which token

        survivors = []  # (parent beam, token, total) of the beams that go on
        for rank, (parent, token, total) in enumerate(zip(parents.tolist(), tokens.tolist(), top_totals.tolist())):
            ends = token in stop_tokens or length == max_new_tokens
            if ends and rank < beam_width:  # only the best beam_width candidates may finish
                finished.append((total / length**length_penalty, beam_tokens[parent] + [token]))
            elif not ends and len(survivors) < beam_width:
                survivors.append((parent, token, total))
        finished = sorted(finished, key=lambda hypothesis: hypothesis[0], reverse=True)[:beam_width]
        if len(finished) == beam_width or not survivors:
            break

        cached = len(prompt_tokens) + length - 1  # positions in the cache; the new tokens go next
        parent_rows = torch.tensor([parent for parent, _, _ in survivors], device=logits.device)
        reorder_kv_cache(model, parent_rows, length=cached)
        beam_tokens = [beam_tokens[parent] + [token] for parent, token, _ in survivors]
        beam_scores = torch.tensor([total for _, _, total in survivors], device=logits.device)
        next_tokens = torch.tensor([[token] for _, token, _ in survivors], device=logits.device)  # (beams, 1)
        logits = decode_one_token(model, next_tokens, cached)  # (beams, vocab)

    return [(tokens, score) for score, tokens in finished]


# ================================================================================================
# 7b. Chat: a conversation that keeps its KV cache
# ================================================================================================
# An instruct model reads a conversation as one token sequence: <|begin_of_text|>, the system
# message, then user and assistant messages in turn, each as header, text, <|eot_id|>; a prompt ends
# with an empty assistant header (chapter 4). Each turn of a chat makes that sequence longer at the
# end and changes nothing before: the previous prompt, then the answer the model generated, closed
# by <|eot_id|>, then the new user message and an assistant header.
#
# So the KV cache left by the last answer is already the start of the next prompt, and a turn needs
# to prefill only the tokens it adds. This is exact, not an approximation: a key or value at position
# p depends only on the tokens at positions 0..p (the causal mask), the positions go on counting
# from where the cache ends, so RoPE rotates each new token as it would in one long prompt, and the
# cached entries are the very numbers a prefill of the whole dialog would compute (up to the order
# of additions in chunked products). The dialog is kept as the token ids the model read and wrote,
# never re-encoded from text: a decoded answer can tokenize differently from how it was generated.
#
# The cache holds CHAT_CONTEXT positions. When the next turn would not fit with room for an answer
# of MAX_NEW_TOKENS, the oldest exchanges (a user message and its answer) are dropped, the system
# message stays, and the shortened dialog is prefilled once from the start: dropping a message moves
# every later token to an earlier position, so its cached keys, rotated for their old positions, no
# longer fit.
#
# Reading: one message per line. A line ending in a backslash goes on, after a line break, on the
# next line. /reset starts a new conversation, /exit or the end of input (Ctrl-D) ends it. Ctrl-C
# during an answer stops it: the history keeps the question and the part of the answer already
# shown, closed as a finished turn, so the model sees what you saw. Ctrl-C at the prompt ends the
# session. Under torchrun, Ctrl-C during an answer ends the session: the other processes are in the
# middle of the same step (torchrun itself stops them all on Ctrl-C).

CHAT_PROMPT, CHAT_CONTINUATION = "you> ", "...> "


@dataclasses.dataclass
class Conversation:
    """The dialog as token ids, one list per message, and how much of it the KV cache holds."""

    start: list  # <|begin_of_text|> and the system message, if any: kept when exchanges are dropped
    exchanges: list = dataclasses.field(default_factory=list)  # [user message tokens + answer tokens]
    cached: int = 0  # positions 0 .. cached-1 of tokens() are in the KV cache

    def tokens(self) -> list:
        return self.start + [token for exchange in self.exchanges for token in exchange]

    def reset(self) -> None:
        self.exchanges = []
        self.keep_only_the_start_cached()

    def drop_oldest_exchange(self) -> None:
        self.exchanges.pop(0)
        self.keep_only_the_start_cached()  # every later token moved to an earlier position

    def keep_only_the_start_cached(self) -> None:
        self.cached = min(self.cached, len(self.start))  # the start is the same: its cache still holds


def read_message(is_main: bool):
    """Rank 0 reads one message from standard input and every process gets it. None: end of input,
    or Ctrl-C at the prompt, which every process must hear of to end together."""
    message = None
    if is_main:
        try:
            message = read_lines()
        except KeyboardInterrupt:
            message = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [message]
        dist.broadcast_object_list(shared, src=0)  # every rank runs every forward pass: all need it
        message = shared[0]
    return message


def read_lines():
    """One message: a line, joined with the next ones while a line ends in a backslash."""
    terminal, lines = sys.stdin.isatty(), []
    while True:
        try:
            line = input((CHAT_CONTINUATION if lines else CHAT_PROMPT) if terminal else "")
        except EOFError:  # the end of input, or Ctrl-D: lines typed before it are sent; none, and the chat ends
            if terminal:
                print()  # the prompt's line ends
            return "\n".join(lines) if lines else None
        if not line.endswith("\\"):
            return "\n".join(lines + [line])
        lines.append(line[:-1])


def make_room(conversation: Conversation, user: list, context: int, is_main: bool) -> bool:
    """Make the dialog, the user's message and an answer of MAX_NEW_TOKENS fit the context, dropping
    the oldest exchanges and saying so; False (and why) where the message cannot fit even alone."""
    if len(conversation.start) + len(user) + MAX_NEW_TOKENS > context:
        if is_main:
            beside = "the system prompt and " if SYSTEM_PROMPT else ""
            print(f"(that message is {len(user)} tokens: with {beside}room for an answer of "
                  f"MAX_NEW_TOKENS = {MAX_NEW_TOKENS} it does not fit the chat's {context} tokens (CHAT_CONTEXT); "
                  "send a shorter one)")
        return False
    dropped = 0
    while conversation.exchanges and len(conversation.tokens()) + len(user) + MAX_NEW_TOKENS > context:
        conversation.drop_oldest_exchange()
        dropped += 1
    if dropped and is_main:
        print(f"(the dialog outgrew the chat's {context} tokens (CHAT_CONTEXT): dropped the {dropped} oldest "
              f"exchange{'s' if dropped > 1 else ''} and prefilled the rest again)")
    return True


def stream_answer(model, steps, tokenizer: Tokenizer, is_main: bool) -> "Streamed":  # chapter 8
    """Print the answer as it comes (rank 0); Ctrl-C stops it and keeps what came so far."""
    streamed = Streamed()
    try:
        if is_main:
            with alternatives_shown(model) as alternatives:
                stream_tokens(steps, tokenizer, SHOW_TOKENS, streamed, alternatives)
        else:
            streamed.tokens.extend(token for token, _ in steps)
    except KeyboardInterrupt:
        if dist.get_world_size() > 1:  # the other processes are in the middle of the same step: end all
            raise
        print("\n(stopped)")
    return streamed


def chat_turn(model, tokenizer: Tokenizer, conversation: Conversation, text: str, is_main: bool, turn: int) -> None:
    """Answer one user message, prefilling only what the cache does not hold, and print a status line."""
    chat_format = ChatFormat(tokenizer)
    user = chat_format.encode_message({"role": "user", "content": text}) + chat_format.encode_header("assistant")
    if not make_room(conversation, user, model.args.max_seq_len, is_main):
        return
    prompt, reused = conversation.tokens() + user, conversation.cached
    # A new seed each turn (the same in every process), else each answer would draw the same numbers.
    steps = decode_steps(model, prompt, MAX_NEW_TOKENS, tokenizer.stop_tokens, seed=SEED + turn, cached=reused)
    started = time.perf_counter()
    streamed = stream_answer(model, steps, tokenizer, is_main)
    finished, answer = time.perf_counter(), streamed.tokens
    conversation.exchanges.append(user + answer + [tokenizer.eot_id])  # the answer closed as a finished turn
    # Every answer token but the last was fed to the model (the last one maybe not: the answer may have
    # ended at MAX_NEW_TOKENS, or been stopped); the next turn prefills from there. No answer: the prefill
    # may not have finished, so only what was cached before is sure.
    conversation.cached = len(prompt) + len(answer) - 1 if answer else reused
    if is_main:
        rate = decode_rate(len(answer), streamed.first_token_time, finished)
        print(f"[prefilled {len(prompt) - reused}, reused {reused}, answer {len(answer)} tokens in "
              f"{finished - started:.1f} s" + (f", decode {rate:.1f} tokens/s" if rate else "") + "]\n")


def check_chat(files: CheckpointFiles) -> None:
    if IS_INSTRUCT is False:
        raise LlamaError("CHAT = True needs an instruct model, and IS_INSTRUCT = False says this is not one: "
                         "set IS_INSTRUCT = None (or True) with an Instruct checkpoint")
    if not is_instruct(files):
        raise LlamaError(f"CHAT = True needs an instruct model, and {files.model_name} has no 'Instruct' in its name: "
                         "use an Instruct checkpoint, or set IS_INSTRUCT = True if it is one")
    if DECODING == "beam":
        raise LlamaError("DECODING = 'beam' does not chat (each turn would need its beams' caches kept): "
                         "use 'greedy' or 'sample' with CHAT = True")


def chat_context(params: ModelArgs) -> int:
    """CHAT_CONTEXT, or the trained context if that is smaller; room for an answer must remain."""
    context = min(CHAT_CONTEXT, params.trained_context)
    if context <= MAX_NEW_TOKENS:
        raise LlamaError(f"CHAT_CONTEXT = {CHAT_CONTEXT} leaves no room for messages beside answers of "
                         f"MAX_NEW_TOKENS = {MAX_NEW_TOKENS}: make CHAT_CONTEXT larger or MAX_NEW_TOKENS smaller")
    return context


def chat(model, tokenizer: Tokenizer, is_main: bool) -> None:
    """The conversation loop: read a message, answer it, until /exit, the end of input or Ctrl-C."""
    start = [tokenizer.bos_id]
    if SYSTEM_PROMPT:
        start += ChatFormat(tokenizer).encode_message({"role": "system", "content": SYSTEM_PROMPT})
    conversation = Conversation(start)
    if is_main and sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # Python without it (Windows): input() as it is
            import readline  # noqa: F401  input() then edits the line (arrow keys, history), and takes any length
    if is_main and hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as U+FFFD, not an exception
        sys.stdin.reconfigure(errors="replace")
    if is_main:
        print(f"chat: one message per line (end a line with \\ to go on on the next), /reset, /exit or "
              f"Ctrl-D to end; the dialog keeps up to {model.args.max_seq_len} tokens (CHAT_CONTEXT)\n")
    for turn in itertools.count():
        text = read_message(is_main)
        command = text.strip() if text is not None else "/exit"  # the end of input ends the chat too
        if command == "/exit":
            if is_main:
                print()
            return
        if command == "/reset":
            conversation.reset()
            if is_main:
                print("(a new conversation)\n")
        elif re.fullmatch(r"/[A-Za-z]+", command):  # /quit, /help: meant for us, not the model
            if is_main:
                print(f"(unknown command {command}: the commands are /reset and /exit; to send it to the "
                      "model, add a word)\n")
        elif command:
            chat_turn(model, tokenizer, conversation, text, is_main, turn)


# ================================================================================================
# 7c. Looking inside the model
# ================================================================================================
# None of this changes what the model computes. Forward hooks (functions PyTorch calls with a
# module's inputs or output whenever it runs) read the numbers as they pass by.
#
# Alternatives and entropy: the model's next-token distribution at each step (before temperature and
# top-p), its most likely candidates, and its entropy in bits: 0 when the model is certain, about 17
# (log2 of the 128,256 tokens) when it has no idea.


def next_token_alternatives(logits: torch.Tensor, k: int) -> tuple:
    """(ids, probabilities) of the k most likely next tokens, and the entropy in bits.   logits: (vocab,)"""
    probs = torch.softmax(logits.float(), dim=-1)  # the output layer's own result, in the weights' dtype
    entropy_bits = float(torch.special.entr(probs).sum()) / math.log(2)  # entr(p) = -p ln p
    top = probs.topk(min(k, probs.numel()))
    return top.indices.tolist(), top.values.tolist(), entropy_bits


@contextlib.contextmanager
def recording_alternatives(model, k: int):
    """While active, each forward pass appends next_token_alternatives(...) of its last position."""
    recorded = []

    def record(module, inputs, logits):  # (batch, seq, vocab), the output layer's result (seq 1 in prefill)
        recorded.append(next_token_alternatives(logits[0, -1], k))

    handle = model.output.register_forward_hook(record)
    try:
        yield recorded
    finally:
        handle.remove()


def alternatives_shown(model):
    """recording_alternatives(model, SHOW_ALTERNATIVES), or a context that records nothing (None)."""
    return recording_alternatives(model, SHOW_ALTERNATIVES) if SHOW_ALTERNATIVES else contextlib.nullcontext()


def alternatives_text(tokenizer: Tokenizer, alternatives: tuple) -> str:
    ids, probs, entropy_bits = alternatives
    candidates = "  ".join(f"{token_text(tokenizer, token)} {percent(prob)}" for token, prob in zip(ids, probs))
    return f"{entropy_bits:>14.2f}  {candidates}"


# The logit lens: every layer adds its contribution to the residual stream h. Reading h after layer i
# through the final norm and the output layer, as if the model stopped there, shows what it would
# predict at that depth: early layers guess vaguely, and the answer forms as layers are added. After
# the last layer this is exactly the model's own prediction.


def logit_lens(model, prompt_tokens: list) -> list:
    """[(layer index, top token, its probability)] for the prompt's last position, after each layer."""
    residuals = {}  # layer index -> (dim,): h at the last position after that layer

    def keeper(index: int):
        def keep_last_position(module, inputs, h):  # h: (batch, chunk, dim), once per prefill chunk
            residuals[index] = h[0, -1].clone()  # the last chunk's stays; a view would keep all of h
        return keep_last_position

    handles = [layer.register_forward_hook(keeper(index)) for index, layer in enumerate(model.layers)]
    try:
        prefill(model, prompt_tokens)  # in chunks, as the prompt of a generation
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    with torch.inference_mode():
        for index, h in sorted(residuals.items()):
            probs = torch.softmax(model.logits(h), dim=-1)  # (vocab,)
            rows.append((index, int(probs.argmax()), float(probs.max())))
    return rows


def print_logit_lens(rows: list, tokenizer: Tokenizer) -> None:
    print("logit lens at the last prompt position, after each layer (0: model.layers[0], the first):\n"
          f"{'layer':>5}  {'prob':>7}  top next token")
    for index, token, probability in rows:
        print(f"{index:>5}  {percent(probability):>7}  {token_text(tokenizer, token)}")
    print()


# Memory: where the bytes go. The weights are the bulk; the KV cache is 2 (keys and values) x layers
# x max_batch_size x max_seq_len x kv heads x head_dim x bytes per number, all of it allocated when
# the model is built (chapter 5 sizes it for the prompt and the answer): on MPS or CUDA a GPU buffer,
# resident from the start; on the CPU pageable zeros that the OS can compress or page out.


def weight_part(name: str) -> str:
    """Which part of the model a weight belongs to, from its name ("layers.3.attention.wq.weight")."""
    if name.startswith("tok_embeddings"):
        return "embedding"
    if name.startswith("output"):
        return "output"
    if "norm" in name:
        return "norms"
    return "attention" if ".attention." in name else "feed-forward"


def memory_report(model) -> dict:
    """Bytes of the weights by part (a tensor shared by two parts is counted once) and of the KV cache."""
    parts = {"embedding": 0, "attention": 0, "feed-forward": 0, "norms": 0, "output": 0}
    counted = set()  # data pointers already counted: the tied output of Llama 3.2 1B/3B is the embedding
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            pieces = [(weight.data_ptr(), weight.nbytes)]
        elif isinstance(weight, QuantizedWeight):  # its buffers, or fbgemm's packing
            pieces = weight.stored_pieces()
        else:
            continue
        for where, size in pieces:
            if where not in counted:
                counted.add(where)
                parts[weight_part(name + ".weight")] += size
    attention = model.layers[0].attention
    cache = attention.cache_k
    return {
        "weights": parts,
        "kv_cache": sum(layer.attention.cache_k.nbytes + layer.attention.cache_v.nbytes for layer in model.layers),
        "kv_cache_sizes": dict(layers=len(model.layers), max_batch_size=cache.shape[0], max_seq_len=cache.shape[2],
                               kv_heads=attention.n_local_kv_heads, head_dim=attention.head_dim, dtype=cache.dtype),
    }


def peak_memory_bytes(device: torch.device):
    """The process's peak resident memory (RAM), the GPU's peak allocation on CUDA, or None (Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def print_memory_report(report: dict, device: torch.device) -> None:
    mib = 2**20
    print("memory:")
    for part, size in report["weights"].items():
        tied = "  (the embedding matrix, shared)" if part == "output" and size == 0 else ""
        print(f"  {part:<14} {size / mib:>10.1f} MiB{tied}")
    print(f"  {'weights, all':<14} {sum(report['weights'].values()) / mib:>10.1f} MiB")
    sizes = report["kv_cache_sizes"]
    print(f"  {'KV cache':<14} {report['kv_cache'] / mib:>10.1f} MiB = 2 x {sizes['layers']} layers x "
          f"{sizes['max_batch_size']} sequence(s) x {sizes['max_seq_len']} positions x {sizes['kv_heads']} kv heads x "
          f"{sizes['head_dim']} (head_dim) x {sizes['dtype'].itemsize} bytes ({sizes['dtype']})")
    peak = peak_memory_bytes(device)
    label = "peak, GPU" if device.type == "cuda" else "peak, RSS"
    if peak is None:
        print(f"  {label:<14} (not measured on this system)\n")
    else:
        below = "  (below the weights: pages of the mapped files not read yet are not counted)" \
            if device.type == "cpu" and peak < sum(report["weights"].values()) else ""
        print(f"  {label:<14} {peak / mib:>10.1f} MiB{below}\n")


# The profile: where a decode step's time goes. A decode step reads every weight once to compute one
# token, so it cannot be faster than the memory can deliver the bytes: the part that reads the most
# (the feed-forward weights, then the output layer, then the attention projections) should take the
# most time, each at close to the memory's speed. A part far below that speed is held up by its
# kernel, not by memory. The attention itself reads the KV cache, which grows by one position per
# token: with a long text it becomes a large part of every step (on Apple's MPS the scripts this
# project grew from slowed down as the text grew, because they recomputed it all at every step).
#
# Forward hooks time every module of each part, on decode steps only (one new token per sequence).
# The parts do not overlap; "rest" is the step's time left over: the residual additions, scores to
# float32, choosing the next token and Python between the modules.

PROFILE_PARTS = ("embedding", "norms", "attention projections", "attention", "feed-forward", "output layer")


def profile_part(name: str) -> str:
    """The part of a decode step a module belongs to, from its name ("layers.3.attention.wq")."""
    if name == "tok_embeddings":
        return "embedding"
    if name == "output":
        return "output layer"
    if name.endswith("norm"):
        return "norms"
    if name.split(".")[-1] in ("wq", "wk", "wv", "wo"):
        return "attention projections"
    return "attention" if name.endswith(".attention") else "feed-forward"


class StepProfile:
    """While active, hooks add up the time and the bytes read of each part of every decode step.

    A module's time runs from its forward pre-hook to its forward hook. The attention module holds
    the four projections, so their time is taken out of its own: "attention" is RoPE, the cache
    write and products.attention. A step runs from one embedding call (the start of a
    forward pass) to the next, like the benchmark's clock, so the last step, which has no next
    start, is left out, and so are the first ones, in which products.py times its candidates.
    """

    def __init__(self, model):
        self.model = model
        self.device = model.output.weight.device
        self.steps = []  # one (seconds, {part: seconds}, {part: bytes}) per complete decode step
        self.step_start, self.batch, self.trials_at_start = None, 1, 0
        self.seconds, self.bytes_read = {}, {}  # of the step under way
        self.started = {}  # module -> perf_counter() at its pre-hook
        self.handles = []
        self.weight_bytes = {}  # module -> bytes of its weights that a product reads, counted once here
        for name, module in model.named_modules():
            if name in ("tok_embeddings", "output") or name.endswith(("norm", ".attention", ".feed_forward",
                                                                       ".wq", ".wk", ".wv", ".wo")):
                self.weight_bytes[module] = weight_bytes(module)
                self._watch(module, profile_part(name))

    def _watch(self, module, part: str):
        def before(module, inputs):
            if module is self.model.tok_embeddings:  # a forward pass starts
                self._start_pass(tokens=inputs[0])
            if self.step_start is not None:
                self.bytes_read[part] = self.bytes_read.get(part, 0) + self._bytes_read(module, inputs)
                synchronize(self.device)  # on a GPU: time this module's kernels, not the ones before
                self.started[module] = time.perf_counter()

        def after(module, inputs, output):
            if self.step_start is not None:
                synchronize(self.device)
                seconds = time.perf_counter() - self.started.pop(module)
                self.seconds[part] = self.seconds.get(part, 0.0) + seconds
                if part == "attention projections":  # they ran inside the attention module's time
                    self.seconds["attention"] = self.seconds.get("attention", 0.0) - seconds

        self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def _start_pass(self, tokens: torch.Tensor):  # tokens: (batch, seq)
        synchronize(self.device)
        now = time.perf_counter()
        decoding = tokens.shape[1] == 1  # one new token per sequence; a prefill is not profiled
        # The previous decode step is complete if this pass is the next one (a prefill comes after a
        # chat's answer, and the time between holds the user's typing). It counts unless products.py
        # was still timing its candidates then: the profile shows the kernels it chose, at their speed.
        if decoding and self.step_start is not None and products.trials_run() == self.trials_at_start:
            self.steps.append((now - self.step_start, self.seconds, self.bytes_read))
        self.step_start, self.batch = (now if decoding else None), tokens.shape[0]
        self.seconds, self.bytes_read = {}, {}
        self.trials_at_start = products.trials_run()

    def _bytes_read(self, module, inputs) -> int:
        """What the module reads from memory: its weights, and for attention the cached keys and values."""
        if module is self.model.tok_embeddings:  # one row of the table per sequence
            return self.batch * module.weight.nbytes // module.weight.shape[0]
        if hasattr(module, "cache_k"):  # inputs = (x, start_pos, cos, sin, mask)
            _, kv_heads, _, head_dim = module.cache_k.shape
            return 2 * self.batch * kv_heads * (inputs[1] + 1) * head_dim * module.cache_k.element_size()
        return self.weight_bytes[module]

    def close(self):
        for handle in self.handles:
            handle.remove()

    def summary(self) -> dict:
        """{part: (seconds, bytes read)} per step, averaged over the complete steps, with "rest" (the
        step's time outside every part) and "step" (the whole)."""
        if not self.steps:
            return {}
        n = len(self.steps)
        rows = {part: (sum(seconds.get(part, 0.0) for _, seconds, _ in self.steps) / n,
                       sum(sizes.get(part, 0) for _, _, sizes in self.steps) / n) for part in PROFILE_PARTS}
        step_seconds = sum(seconds for seconds, _, _ in self.steps) / n
        rows["rest"] = (step_seconds - sum(seconds for seconds, _ in rows.values()), 0)
        rows["step"] = (step_seconds, sum(size for _, size in rows.values()))
        return rows


def weight_bytes(module) -> int:
    """Bytes a product reads of each matrix or norm weight inside: a tensor, or a quantized or packed matrix."""
    weights = [inner.weight for inner in module.modules()
               if isinstance(getattr(inner, "weight", None), (torch.Tensor, QuantizedWeight))]
    return sum(weight.nbytes if isinstance(weight, torch.Tensor) else weight.bytes_per_product for weight in weights)


def part_kernels(model, part: str, rows: int) -> str:
    """The product kernels a part uses (products.py chose them by timing), e.g. "F.linear (wq, wo)"."""
    if part == "attention":
        return products.chosen_attention(model.output.weight.device, batch=rows)
    users = {}  # kernel name -> the weight names that use it
    for name, module in model.named_modules():
        if profile_part(name) == part and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            users.setdefault(products.chosen_kernel(rows, module.weight), []).append(name.split(".")[-1])
    return "; ".join(f"{kernel} ({', '.join(dict.fromkeys(names))})" for kernel, names in users.items())


def print_profile(model, profile: StepProfile, bandwidth: float) -> None:
    rows = profile.summary()
    if not rows:
        print("profile: no decode step ran after products.py had chosen its kernels: raise MAX_NEW_TOKENS "
              "(the first decode steps time the candidates: SHOW_PROFILE leaves those out)\n")
        return
    steps = len(profile.steps)
    print(f"where a decode step's time goes ({steps} steps of batch {profile.batch}, after the first ones, which "
          f"timed the kernels; this machine's memory reads {bandwidth / 1e9:.1f} GB/s, timed just now on a "
          "scratch tensor):")
    print(f"  {'part':<22} {'ms/step':>8} {'MiB read':>9} {'GB/s':>6} {'% of memory':>11}  kernels")
    for part, (seconds, size) in rows.items():
        speed = size / seconds if size >= 2**20 and seconds > 0 else None  # below a MiB it says nothing
        speed_text = f"{speed / 1e9:>6.1f} {speed / bandwidth:>11.0%}" if speed else f"{'':>6} {'':>11}"
        print(f"  {part:<22} {seconds * 1e3:>8.2f} {size / 2**20:>9.1f} {speed_text}  "
              f"{part_kernels(model, part, profile.batch)}".rstrip())
    print()


# Attention over the prompt: how much each prompt position looks at every earlier one, in the last
# layer, averaged over heads. The model does not keep these weights, so a hook grabs the last
# attention layer's input during the prefill and this helper recomputes them the model's way.


def last_layer_attention(model, prompt_tokens: list) -> torch.Tensor:
    """Attention weights of the last layer over the prompt.   # (heads, seq, seq), rows sum to 1"""
    captured = {}

    def grab_inputs(module, inputs):  # inputs = (x, start_pos, cos, sin, mask), as in Attention.forward
        captured["x"], _, captured["cos"], captured["sin"], captured["mask"] = inputs

    attention = model.layers[-1].attention
    handle = attention.register_forward_pre_hook(grab_inputs)
    try:
        model.hidden_states(prompt_tensor(model, prompt_tokens), start_pos=0)
    finally:
        handle.remove()
    x, seq, head_dim = captured["x"], len(prompt_tokens), attention.head_dim  # x: (1, seq, dim), normed
    cos, sin, mask = captured["cos"], captured["sin"], captured["mask"]  # (seq, head_dim/2) each; (seq, seq) bool
    with torch.inference_mode():
        q = apply_rope(attention.wq(x).view(1, seq, attention.n_local_heads, head_dim), cos, sin)  # (1, seq, heads, head_dim)
        k = apply_rope(attention.wk(x).view(1, seq, attention.n_local_kv_heads, head_dim), cos, sin)
        k = k.repeat_interleave(attention.n_rep, dim=2)  # (1, seq, heads, head_dim): each kv head serves n_rep
        scores = torch.einsum("qhd,khd->hqk", q[0].float(), k[0].float()) / math.sqrt(head_dim)  # (heads, seq, seq)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def save_attention_png(attention: torch.Tensor, tokenizer: Tokenizer, prompt: list, path: str) -> None:
    import matplotlib  # optional, so imported here: check_settings made sure it is installed

    matplotlib.use("Agg")  # draw to a file; no window
    import matplotlib.pyplot as plt

    labels = [token_text(tokenizer, token) for token in prompt]
    figure, axes = plt.subplots(figsize=(2 + len(prompt) / 4, 1.5 + len(prompt) / 4))
    axes.imshow(attention.mean(dim=0).cpu().numpy(), cmap="viridis")  # (seq, seq), averaged over heads
    axes.set_xticks(range(len(prompt)), labels, rotation=90, fontsize=7)
    axes.set_yticks(range(len(prompt)), labels, fontsize=7)
    axes.set_xlabel("attended-to position")
    axes.set_ylabel("query position")
    axes.set_title("last layer attention, mean over heads")
    figure.tight_layout()
    figure.savefig(Path(path).expanduser(), dpi=120)
    print(f"wrote {path}\n")


def look_inside(model, tokenizer: Tokenizer, prompt: list, is_main: bool) -> None:
    """The views of the prompt chosen in the settings (alternatives come with decoding, memory after it).
    Every process runs the forward passes (under torchrun they need each other); rank 0 prints."""
    if SHOW_LOGIT_LENS:
        rows = logit_lens(model, prompt)
        if is_main:
            print_logit_lens(rows, tokenizer)
    if ATTENTION_PNG is not None:
        attention = last_layer_attention(model, prompt)
        if is_main:
            save_attention_png(attention, tokenizer, prompt, ATTENTION_PNG)


# ================================================================================================
# 8. Report, and main()
# ================================================================================================


def print_token_row(step: int, token: int, probability: float, tokenizer: Tokenizer, text_width: int) -> None:
    print(f"{step:>5}  {token:>6}  {percent(probability):>8}  {padded(token_text(tokenizer, token), text_width)}", end="")


def padded(text: str, columns: int) -> str:
    """text and spaces to fill `columns` of a terminal, where a Chinese, Japanese or Korean character
    takes two and a combining accent none (str.ljust counts characters, which puts the next column
    out of line)."""
    width = sum(0 if unicodedata.combining(character) else 2 if unicodedata.east_asian_width(character) in "WF"
                else 1 for character in text)
    return text + " " * (columns - width)


@dataclasses.dataclass
class Streamed:
    """What stream_tokens has printed so far: kept by the caller, so that Ctrl-C loses none of it."""

    tokens: list = dataclasses.field(default_factory=list)
    first_token_time: float = None  # time.perf_counter() when the first token arrived


def stream_tokens(steps, tokenizer: Tokenizer, show_tokens: bool, streamed: Streamed, alternatives: list = None):
    """Print each (token, probability) as it arrives, recording it in `streamed`.

    A table instead of text when show_tokens or `alternatives` (recorded per step, see chapter 7c).
    """
    table = show_tokens or alternatives is not None
    text_width = 16 if alternatives is not None else 0  # align the alternatives column
    if table:  # sampling draws from the distribution after TEMPERATURE and TOP_P: its probability is that one's
        prob = "p(drawn)" if DECODING == "sample" else "prob"
        header = f"{'step':>5}  {'id':>6}  {prob:>8}  {'text':<{text_width}}"
        print(header + ("  |  entropy (bits)  alternatives (the model's distribution)" if alternatives is not None else ""))
    decoder, tokens = StreamingDecoder(tokenizer), streamed.tokens
    for token, probability in steps:
        streamed.first_token_time = streamed.first_token_time or time.perf_counter()
        tokens.append(token)
        if table:
            print_token_row(len(tokens), token, probability, tokenizer, text_width)
            if alternatives is not None:  # the distribution this token was chosen from
                print(f"  |  {alternatives_text(tokenizer, alternatives[len(tokens) - 1])}", end="")
            print()
        else:
            print(printable(decoder.push(token)), end="", flush=True)
    if not table:
        print(printable(decoder.flush()))  # the text's last characters and its line's end


@contextlib.contextmanager
def beam_progress(model, max_steps: int, shown: bool):
    """Beam search prints its beams at the end: until then, when `shown`, a line on standard error
    counts its steps (one forward pass each), and is erased when it ends."""
    if not shown:
        yield
        return
    steps, line = itertools.count(1), ""

    def show(module, inputs, logits):
        nonlocal line
        line = f"(beam search: step {next(steps)} of at most {max_steps})"
        sys.stderr.write("\r" + line)
        sys.stderr.flush()

    handle = model.output.register_forward_hook(show)
    try:
        yield
    finally:
        handle.remove()
        sys.stderr.write("\r" + " " * len(line) + "\r")


def print_beams(beams: list, tokenizer: Tokenizer) -> None:
    for rank, (tokens, score) in enumerate(beams, start=1):
        text = tokenizer.decode([token for token in tokens if token not in tokenizer.stop_tokens])
        joint_log_prob = score * len(tokens) ** LENGTH_PENALTY
        print(f"--- beam {rank}: log-probability {joint_log_prob:.3f}, score {score:.4f}, {len(tokens)} tokens")
        print(printable(text))


def print_timing(prompt_length: int, generated: int, started: float, first_token: float, finished: float):
    print(f"\nprompt: {prompt_length} tokens, generated: {generated} token{'s' if generated != 1 else ''}")
    if first_token is None:
        return
    print(f"prefill: {first_token - started:.2f} s ({prompt_length / (first_token - started):.1f} tokens/s)")
    rate = decode_rate(generated, first_token, finished)
    if rate:
        print(f"decode: {rate:.2f} tokens/s")


def decode_rate(generated: int, first_token: float, finished: float):
    """Tokens a second after the first (which came from the prefill; each later one took one decode
    step), or None where there were none."""
    if first_token is None or generated < 2:
        return None
    return (generated - 1) / (finished - first_token)


def generate_and_print(model, tokenizer: Tokenizer, prompt: list, is_main: bool) -> None:
    stop_tokens = tokenizer.stop_tokens
    max_new_tokens = model.args.max_seq_len - len(prompt)  # MAX_NEW_TOKENS, or less near the context limit
    if max_new_tokens < MAX_NEW_TOKENS and is_main:
        print(f"(the prompt is {len(prompt)} tokens, so {max_new_tokens} of MAX_NEW_TOKENS = {MAX_NEW_TOKENS} fit "
              f"in the model's context of {model.args.max_seq_len})\n")
    started = time.perf_counter()
    if DECODING == "beam":
        with beam_progress(model, max_new_tokens, shown=is_main and sys.stderr.isatty()):
            beams = beam_search(model, prompt, BEAM_WIDTH, max_new_tokens, stop_tokens, LENGTH_PENALTY)
        finished = time.perf_counter()
        if is_main:
            print_beams(beams, tokenizer)
            steps = max(len(tokens) for tokens, _ in beams)
            print(f"\nprompt: {len(prompt)} tokens, {steps} beam steps of width {BEAM_WIDTH} "
                  f"in {finished - started:.2f} s, the prompt's prefill included")
        return
    steps = decode_steps(model, prompt, max_new_tokens, stop_tokens)
    if not is_main:  # other ranks take part in every forward pass but print nothing
        for _ in steps:
            pass
        return
    streamed, trials_before = Streamed(), products.trials_run()
    with alternatives_shown(model) as alternatives:  # None when SHOW_ALTERNATIVES is 0
        stream_tokens(steps, tokenizer, SHOW_TOKENS, streamed, alternatives)
    finished = time.perf_counter()
    print_timing(len(prompt), len(streamed.tokens), started, streamed.first_token_time, finished)
    if products.trials_run() > trials_before:
        print(first_products_note(model))


def first_products_note(model) -> str:
    """Why a first prompt is slower than later ones (README, "Speed and memory, measured")."""
    mapped = " and read in the weights still in their file" if model.output.weight.device.type == "cpu" else ""
    return f"(the first products of each kind timed the candidate kernels{mapped}: later prompts run faster)"


def run() -> None:
    check_settings()  # 1. settings
    device = resolve_device(DEVICE)
    dtype = resolve_dtype(DTYPE, device)
    folder = checkpoint_folder(LLAMA_MODELS_DIR, MODEL_NAME, Path(__file__).name)
    files = find_checkpoint_files(folder)

    device, is_main = start_processes(device)  # 2. start torch.distributed and fairscale
    params = ModelArgs.from_json_file(files.params)  # 3. read params.json
    check_quantize_request(QUANTIZE, params, files.folder)

    if is_main:
        for note in unused_settings(is_instruct(files), params.trained_context):
            print(f"note: {note}")
    tokenizer = load_tokenizer(files.tokenizer, params)  # 4. tokenize the prompt
    if CHAT:  # the prompts come later, one per turn
        check_chat(files)
        prompt, args = None, dataclasses.replace(params, max_seq_len=chat_context(params), max_batch_size=1)
    else:
        prompt = encode_prompt(tokenizer, INPUT_STRING, is_instruct(files))
        if is_main and SHOW_PROMPT_TOKENS:
            show_tokenizer_file(files.tokenizer)
            show_prompt_tokens(tokenizer, prompt)
        batch_size = BEAM_WIDTH if DECODING == "beam" else 1  # 5. build the Transformer
        args = model_args_for(params, len(prompt), batch_size)
    model = build_model(args, device, dtype)

    load_started = time.perf_counter()  # 6. load the weights
    load_weights(model, files, device, dtype)
    scheme = params.stored_scheme or QUANTIZE  # a quantized folder's own, or ours
    quantize_loaded(model, QUANTIZE, params, files.shards, quantizing_progress(scheme, is_main))  # 6b. quantize them
    if scheme and device.type != "cpu" and is_main:
        print(how_quantized_matrices_multiply(model, scheme, device, dtype))
    if is_main:
        stored = f"{dtype} ({scheme} matrices)" if scheme else f"{dtype}"
        print(f"{files.model_name}: {args.n_layers} layers, dim {args.dim}, {stored} on {device}, "
              f"loaded in {time.perf_counter() - load_started:.1f} s\n")
    if not CHAT:
        look_inside(model, tokenizer, prompt, is_main)  # 7c. looking inside, before decoding

    profile = StepProfile(model) if SHOW_PROFILE and is_main else None
    if CHAT:
        chat(model, tokenizer, is_main)  # 7b. chat
    else:
        generate_and_print(model, tokenizer, prompt, is_main)  # 7. decode, 8. report
    if SHOW_MEMORY and is_main:  # after decoding: memory-mapped weights are read in on first use
        print_memory_report(memory_report(model), device)
    if profile:
        profile.close()
        print_profile(model, profile, memory_read_bandwidth(device=device))
    end_model_parallel()  # close torch.distributed: a process that exits with it open may abort


def main(arguments=()) -> None:
    """Run with the settings at the top; any error the user can fix ends in one line and exit code 1,
    an interrupt (Ctrl-C) in exit code 130, as shells report a process ended by SIGINT."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again
    try:
        if arguments:
            raise LlamaError(f"{Path(__file__).name} takes no command-line arguments (got {' '.join(arguments)}): "
                             "edit the settings at the top of the file, or name a checkpoint folder with "
                             "LLAMA_CHECKPOINT_DIR=...")
        run()
    except LlamaError as error:
        exit_with_error(error)
    except KeyboardInterrupt:
        exit_interrupted()


if __name__ == "__main__":
    main(sys.argv[1:])
