"""The shortest complete way to run a Llama 3.x checkpoint. run_inference.py tells the same stages in full."""

import contextlib
import dataclasses
import io
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch imports: exit code 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fairscale.nn.model_parallel.initialize import initialize_model_parallel  # noqa: E402

try:  # Meta's downloader package has our package's name: if it replaced ours, say so
    from llama_models.llama3 import ChatFormat, LlamaError, ModelArgs, StreamingDecoder, Transformer
    from llama_models.llama3.args import is_whole_number
    from llama_models.llama3.checkpoint import (checkpoint_folder, convert_one_by_one, find_checkpoint_files,
                                                load_tokenizer, match_checkpoint_to_model)
    from llama_models.llama3.devices import resolve_device
    from llama_models.llama3.quantize import pack_for_cpu
    from llama_models.llama3.sharding import read_shard
    from llama_models.llama3.tokenizer import printable
except ImportError as error:
    sys.exit(f"error: cannot import this project's llama_models ({error}). Meta's llama-models package has the same "
             "name: run `pip install -r requirements.txt` here, and Meta's downloader in its own environment (README)")

# 1. Settings
MODEL_NAME = "Llama3.2-1B-Instruct"  # a folder under LLAMA_MODELS_DIR ("Instruct" in the name: chat prompt)
LLAMA_MODELS_DIR = "~/.llama/checkpoints"  # where `llama-model download` puts checkpoints
INPUT_STRING = "Explain in two sentences why the sky is blue."  # the prompt
DEVICE = "auto"  # "auto", "cpu", "cuda" or "mps"
MAX_NEW_TOKENS = 128  # stop after this many tokens unless the model ends its answer first


def main():
    folder = checkpoint_folder(LLAMA_MODELS_DIR, MODEL_NAME, Path(__file__).name)  # or LLAMA_CHECKPOINT_DIR's
    files = find_checkpoint_files(folder)  # params.json, tokenizer.model, *.pth (also in Hugging Face's original/)
    if len(files.shards) > 1 or os.environ.get("WORLD_SIZE", "1") != "1":  # several shards, or under torchrun
        raise LlamaError(f"this script runs one process on one shard ({files.folder} has {len(files.shards)}): use "
                         "run_inference.py, which merges shards or splits them over torchrun's processes")
    device = resolve_device(DEVICE)

    # 2. Start torch.distributed and fairscale (a group of one process)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints three banner lines
        initialize_model_parallel(1)

    # 3. Read params.json
    params = ModelArgs.from_json_file(files.params)

    # 4. Tokenize the prompt
    tokenizer = load_tokenizer(files.tokenizer, params)  # a Tokenizer, checked against params.json
    if not isinstance(INPUT_STRING, str) or not INPUT_STRING.strip():
        raise LlamaError(f"INPUT_STRING = {INPUT_STRING!r}: write a prompt in quotes")
    if files.named_instruct:
        prompt = ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": INPUT_STRING}])
    else:
        prompt = tokenizer.encode(INPUT_STRING, bos=True, eos=False)

    if not is_whole_number(MAX_NEW_TOKENS) or MAX_NEW_TOKENS < 1:
        raise LlamaError(f"MAX_NEW_TOKENS = {MAX_NEW_TOKENS!r}: write a whole number of at least 1")
    context = params.trained_context  # 128k tokens for Llama 3.1 and later, 8k before
    if len(prompt) + MAX_NEW_TOKENS > context:
        raise LlamaError(f"the prompt ({len(prompt)} tokens) and MAX_NEW_TOKENS = {MAX_NEW_TOKENS} exceed the model's "
                         f"context of {context} tokens: shorten the prompt or lower MAX_NEW_TOKENS")

    # 5. Build the Transformer, its KV cache sized for this prompt and answer. Weights stay bfloat16,
    # unless the folder was written by `python -m llama_models.quantize` (int8 or int4; run_inference.py, 6b)
    args = dataclasses.replace(params, max_seq_len=len(prompt) + MAX_NEW_TOKENS)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Transformer(args)

    # 6. Load the weights: torch.load(..., mmap=True, weights_only=True), so no copy on the CPU and no
    # code run; then every name and shape checked (3.2 1B/3B may share one embedding/output matrix),
    # and each tensor moved to the device in bfloat16 (Meta's files are, and stay where they lie)
    weights = match_checkpoint_to_model(read_shard(files.shards[0]), model, files.shards[0])
    convert_one_by_one(weights, device, torch.bfloat16, files.shards)  # a shared matrix stays one
    model.load_state_dict(weights, strict=True, assign=True)
    pack_for_cpu(model, files.shards)  # int4 folders only: the CPU kernel's layout, and the file's codes let go

    # 7. Decode: prefill the prompt once, then one token per step through the KV cache
    started = time.perf_counter()
    logits = model(torch.tensor([prompt], device=device), start_pos=0)
    if not logits[0, -1].isfinite().all():
        raise LlamaError("the model's scores are NaN or infinite: its weights hold such numbers; download them again")
    decoder, generated = StreamingDecoder(tokenizer), []
    token = int(logits[0, -1].argmax())  # greedy: the most likely next token
    while token not in tokenizer.stop_tokens:
        generated.append(token)
        print(printable(decoder.push(token)), end="", flush=True)  # control characters escaped
        if len(generated) == MAX_NEW_TOKENS:
            break
        logits = model(torch.tensor([[token]], device=device), start_pos=len(prompt) + len(generated) - 1)
        token = int(logits[0, -1].argmax())

    # 8. Report
    print(printable(decoder.flush()))
    print(f"\n{len(generated)} tokens in {time.perf_counter() - started:.1f} s, the prompt's prefill included")
    dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C raises KeyboardInterrupt
    if sys.argv[1:]:
        sys.exit(f"error: this script takes no arguments (got {' '.join(sys.argv[1:])}): edit its settings at the top, "
                 "or set LLAMA_CHECKPOINT_DIR")
    try:
        main()
    except LlamaError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
