"""Run by test_parallel.py under torchrun: decode greedily from each checkpoint folder, save the results.

    torchrun --standalone --nproc-per-node 2 tests/parallel_worker.py OUT_DIR CKPT_DIR [CKPT_DIR ...]

Every process writes OUT_DIR/<i>.rank<r>.pt for the i-th folder (the tokens and logits it computed),
so the test can check that all processes agree with each other and with one process on the
unsharded checkpoint. Only the main process prints.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llama_models.llama3 import load_llama
from llama_models.llama3.parallel import broadcast_tokens, end_model_parallel, is_main_process

PROMPT = [5, 17, 99, 300, 42, 7]
N_NEW_TOKENS = 5


def greedy_decode(model, prompt: list[int], n_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The argmax token after each step, and the logits it came from.   # (n_new_tokens, vocab)"""
    logits = model(torch.tensor([prompt]), start_pos=0)[0, -1]
    tokens, all_logits = [], []
    for position in range(len(prompt), len(prompt) + n_new_tokens):
        tokens.append(logits.argmax().item())
        all_logits.append(logits)
        logits = model(torch.tensor([[tokens[-1]]]), start_pos=position)[0, -1]
    return tokens, torch.stack(all_logits)


def main(out_dir: Path, folders: list[str]) -> None:
    for index, folder in enumerate(folders):
        model, _ = load_llama(folder, dtype=torch.float32, max_seq_len=len(PROMPT) + N_NEW_TOKENS)
        tokens, logits = greedy_decode(model, PROMPT, N_NEW_TOKENS)
        result = dict(
            tokens=tokens,
            logits=logits,
            from_rank_0=broadcast_tokens(torch.tensor([dist.get_rank()])).item(),  # 0 in every process
            kv_cache_heads=model.layers[0].attention.n_local_kv_heads,
        )
        torch.save(result, out_dir / f"{index}.rank{dist.get_rank()}.pt")
        if is_main_process():
            print(f"{folder}: {tokens}")
    end_model_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
