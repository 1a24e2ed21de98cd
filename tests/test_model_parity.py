"""Our Transformer against Hugging Face transformers' LlamaForCausalLM on the same weights."""

import pytest
import torch

from checkpoints import TINY_SHAPES
from hf_reference import hf_model_from_meta_checkpoint
from llama_models.llama3 import load_llama

TOLERANCE = 1e-4  # float32 on both sides; the two differ only in the order of additions


def random_tokens(batch: int, seq: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape_name", sorted(TINY_SHAPES))
def test_full_forward_matches_transformers(tiny_checkpoint, shape_name):
    folder = tiny_checkpoint(shape_name)
    model, _ = load_llama(folder, dtype=torch.float32, max_seq_len=64, max_batch_size=2)
    reference = hf_model_from_meta_checkpoint(folder, rope_scale_factor=model.args.rope_scale_factor)
    tokens = random_tokens(2, 40, model.args.vocab_size)

    ours = model(tokens, start_pos=0)
    with torch.no_grad():
        theirs = reference(tokens).logits

    assert ours.dtype == torch.float32
    assert ours.shape == (2, 40, model.args.vocab_size)
    assert (ours - theirs).abs().max().item() < TOLERANCE
    assert theirs.std().item() > 0.1  # the logits are not trivially small, so the check means something


@pytest.mark.parametrize("shape_name", sorted(TINY_SHAPES))
def test_cached_decoding_matches_full_forward(tiny_checkpoint, shape_name):
    """Prefill 5 tokens, then feed one token per call: each step's logits equal the full pass's."""
    model, _ = load_llama(tiny_checkpoint(shape_name), dtype=torch.float32, max_seq_len=64, max_batch_size=2)
    tokens = random_tokens(2, 20, model.args.vocab_size, seed=1)
    full = model(tokens, start_pos=0)

    prefill = model(tokens[:, :5], start_pos=0)
    steps = [model(tokens[:, pos : pos + 1], start_pos=pos) for pos in range(5, 20)]
    cached = torch.cat([prefill, *steps], dim=1)

    assert (cached - full).abs().max().item() < TOLERANCE


def test_chunked_prefill_matches_full_forward(tiny_checkpoint):
    """Two multi-token calls (the second with start_pos > 0) exercise the mask's cached-columns part."""
    model, _ = load_llama(tiny_checkpoint("gqa3"), dtype=torch.float32, max_seq_len=64)
    tokens = random_tokens(1, 24, model.args.vocab_size, seed=2)
    full = model(tokens, start_pos=0)
    chunked = torch.cat([model(tokens[:, :10], start_pos=0), model(tokens[:, 10:], start_pos=10)], dim=1)
    assert (chunked - full).abs().max().item() < TOLERANCE


def test_bfloat16_model_is_close_to_float32(tiny_checkpoint):
    """The default CPU dtype: same weights (the file is bfloat16), activations rounded to bfloat16."""
    folder = tiny_checkpoint("gqa4")
    exact, _ = load_llama(folder, dtype=torch.float32, max_seq_len=32)
    fast, _ = load_llama(folder, max_seq_len=32)  # dtype=None picks bfloat16 on the CPU
    tokens = random_tokens(1, 16, exact.args.vocab_size, seed=3)
    reference = exact(tokens, start_pos=0)
    assert fast.tok_embeddings.weight.dtype == torch.bfloat16
    relative_error = (fast(tokens, start_pos=0) - reference).norm() / reference.norm()
    assert relative_error.item() < 0.05
