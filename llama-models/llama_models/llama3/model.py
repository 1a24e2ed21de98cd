"""The Llama 3.x transformer, from token ids to next-token logits.

    tokens (batch, seq)
      -> tok_embeddings                      (batch, seq, dim)
      -> n_layers x TransformerBlock:        h = h + attention(attention_norm(h))
                                             h = h + feed_forward(ffn_norm(h))
      -> norm -> output                      (batch, seq, vocab) float32 logits

Every module name equals a key in Meta's `consolidated.00.pth` (`layers.0.attention.wq.weight`, ...),
so the checkpoint loads with `load_state_dict(strict=True)` and no renaming.

The linear layers and the embedding are fairscale's model-parallel layers (with our constructors
and matrix product, see "Parallel layers"). With one process they behave like `nn.Linear(bias=False)`
and `nn.Embedding`; with N processes (torchrun) each process holds 1/N of every matrix and fairscale
adds the communication. The local sizes below
(`n_local_heads`, ...) are the per-process share.

Shapes use: batch, seq (tokens in this call), kv_len (tokens cached so far plus this call),
dim, n_heads, n_kv_heads, head_dim (= dim / n_heads), vocab. With N processes the head counts and
ffn_hidden_dim in them are each process's share (n_local_heads = n_heads / N, ...; with more
processes than key/value heads, each holds one, repeated: sharding.py).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import get_model_parallel_rank, get_model_parallel_world_size
from fairscale.nn.model_parallel import layers as fairscale_layers
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from fairscale.nn.model_parallel.utils import VocabUtility
from torch import nn

from .args import UNSCALED_CONTEXT, LlamaError, ModelArgs
from .products import attention, embedding, linear
from .quantize import hold_quantized_weights


# ------------------------------------------------------------------------------------------------
# Parallel layers
# ------------------------------------------------------------------------------------------------
# fairscale's ColumnParallelLinear, RowParallelLinear and VocabParallelEmbedding, with two changes:
#
# 1. Construction. fairscale's own __init__ allocates each weight in CPU memory (with the legacy
#    torch.Tensor(rows, cols), which ignores the default device) and initialises it; with several
#    processes it first builds the whole unsharded matrix and copies this process's slice out of
#    it, which writes every page and fails outright when the default device is a GPU. The checkpoint
#    replaces every weight anyway, so our __init__ sets the same attributes and gives the weight a
#    placeholder on the meta device: a shape with no memory behind it. `load_state_dict(...,
#    assign=True)` then puts the checkpoint's tensors in its place, and no second copy ever exists.
#
# 2. The product of the linear layers, `linear`, uses the fastest PyTorch kernel it timed on this device, and the
#    embedding's lookup is `embedding`; both also take quantized weights (products.py, quantize.py).
#    fairscale's mapping functions still do all the communication between processes.


def _weight_placeholder(rows: int, cols: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(rows, cols, device="meta"), requires_grad=False)


class ColumnParallelLinear(fairscale_layers.ColumnParallelLinear):
    """y = x @ W.T, where each process holds a block of W's rows (outputs). No bias (Llama has none).

    Every process has the whole input, so it computes its block of the output without talking to
    the others; gather_output=True then concatenates all processes' blocks.
    """

    def __init__(self, in_features: int, out_features: int, gather_output: bool = True):
        nn.Module.__init__(self)  # not fairscale's __init__: see "Parallel layers" above
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        self.output_size_per_partition = out_features // get_model_parallel_world_size()
        self.weight = _weight_placeholder(self.output_size_per_partition, in_features)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)  # (..., out / n_processes)
        return gather_from_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(fairscale_layers.RowParallelLinear):
    """y = x @ W.T, where each process holds a block of W's columns (inputs). No bias.

    Each process receives the matching block of the input (the heads or hidden units it computed
    itself), and the partial products are summed across processes (an all-reduce).
    """

    def __init__(self, in_features: int, out_features: int):
        nn.Module.__init__(self)  # not fairscale's __init__: see "Parallel layers" above
        self.in_features, self.out_features = in_features, out_features
        self.input_size_per_partition = in_features // get_model_parallel_world_size()
        self.weight = _weight_placeholder(out_features, self.input_size_per_partition)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_model_parallel_region(linear(x, self.weight))  # (..., out)


class VocabParallelEmbedding(fairscale_layers.VocabParallelEmbedding):
    """Token id -> row of the embedding matrix, each process holding a block of the vocabulary.

    A process looks up the ids it owns, writes zeros for the others, and the processes sum their
    results, so every process ends with every token's vector.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        nn.Module.__init__(self)  # not fairscale's __init__: see "Parallel layers" above
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        rank, size = get_model_parallel_rank(), get_model_parallel_world_size()
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, rank, size
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = _weight_placeholder(self.num_embeddings_per_partition, embedding_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (batch, seq) -> (batch, seq, dim)
        # fairscale's forward, with the lookup by `embedding`, which also reads quantized rows.
        outside = (tokens < self.vocab_start_index) | (tokens >= self.vocab_end_index)  # (batch, seq): other processes' ids
        local_ids = (tokens - self.vocab_start_index).masked_fill(outside, 0)
        vectors = embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)  # (batch, seq, dim)
        return reduce_from_model_parallel_region(vectors)


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned per-channel weight.

    Cheaper than LayerNorm: no mean is subtracted and there is no bias.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares is taken in float32: in bfloat16 (8 bits of mantissa) a sum over
        # thousands of channels loses most of its digits.
        x32 = x.float()
        normalised = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normalised.type_as(x) * self.weight


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# ------------------------------------------------------------------------------------------------
# Attention by itself does not know where tokens are. RoPE tells it by rotating each query and key:
# channels (0, 1) form a 2-D point rotated by angle pos * freq_0, channels (2, 3) by pos * freq_1, and
# so on (Meta's "interleaved" pairs; Hugging Face pairs channel j with j + head_dim/2 instead). The dot
# product of two rotated vectors depends only on the distance between their positions.
#
# Meta writes this with complex numbers; we use cos/sin on real tensors, the same arithmetic, because
# several complex-number kernels are missing on Apple's MPS backend.


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """One rotation speed per channel pair, fastest first: theta^(-2i/head_dim).   # (head_dim/2,)"""
    pair_index = torch.arange(0, args.head_dim, 2, dtype=torch.float32, device="cpu")
    freqs = 1.0 / (args.rope_theta ** (pair_index / args.head_dim))
    if args.use_scaled_rope:
        freqs = scale_rope_frequencies(freqs, args.rope_scale_factor)
    return freqs


# Llama 3.1's RoPE scaling: the same two constants in every Llama 3.x model (params.json names none).
ROPE_LOW_FREQ_FACTOR, ROPE_HIGH_FREQ_FACTOR = 1.0, 4.0


def scale_rope_frequencies(freqs: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Llama 3.1's context extension from 8k to 128k tokens.   freqs (head_dim/2,) -> (head_dim/2,)

    Pairs that turn fast (wavelength under UNSCALED_CONTEXT / ROPE_HIGH_FREQ_FACTOR = 2048 tokens) encode
    local order and are kept. Pairs that turn so slowly that they never finished a turn in the 8k
    training context are slowed down further by `scale_factor`, so that 128k positions still map to
    angles the model has seen. Wavelengths in between blend smoothly between the two.
    """
    wavelength = 2 * math.pi / freqs
    short_wavelength = UNSCALED_CONTEXT / ROPE_HIGH_FREQ_FACTOR  # 2048
    long_wavelength = UNSCALED_CONTEXT / ROPE_LOW_FREQ_FACTOR  # 8192
    # 0 at the long end, 1 at the short end of the blended band.
    smooth = (UNSCALED_CONTEXT / wavelength - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelength > long_wavelength, freqs / scale_factor, blended)
    return torch.where(wavelength < short_wavelength, freqs, scaled)


def rope_cos_sin(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every rotation angle the cache can need.   # 2 x (max_seq_len, head_dim/2)

    Computed in float32 on the CPU so every device uses the same table.
    """
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device="cpu")
    angles = torch.outer(positions, rope_frequencies(args))
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x by its position's angle.

    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim/2). Returns x's shape and dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (batch, seq, heads, head_dim/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]  # each (batch, seq, heads, head_dim/2)
    cos = cos[None, :, None, :]  # (1, seq, 1, head_dim/2): same angle for every batch row and head
    sin = sin[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# ------------------------------------------------------------------------------------------------
# Causal mask
# ------------------------------------------------------------------------------------------------


def causal_mask(seq: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """Which keys each new token may attend to: itself and earlier positions.   # (seq, kv_len) bool

    Row i is the token at position start_pos + i; column j is cached position j. Entry (i, j) is True
    where j <= start_pos + i; attention gives the False entries (the future) weight 0.

    Meta builds an additive mask with torch.triu on a matrix full of -inf. On Apple's MPS backend that
    returned NaN instead of 0 below the diagonal (pytorch issue #100005: the kernel computed the
    dropped part as -inf - (-inf)), and one NaN in a row of scores makes the whole row NaN after
    softmax. Comparing position indices builds the mask without that kernel, on any device.
    """
    query_positions = torch.arange(start_pos, start_pos + seq, device=device)[:, None]  # (seq, 1)
    key_positions = torch.arange(start_pos + seq, device=device)[None, :]  # (1, kv_len)
    return key_positions <= query_positions


# ------------------------------------------------------------------------------------------------
# Attention with a KV cache
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query self-attention that remembers past keys and values.

    The KV cache: generating token t needs the keys and values of tokens 0..t-1. They do not change
    once computed, so each layer stores them in `cache_k` / `cache_v`, and a decode step feeds only
    the one new token (start_pos = its position) instead of recomputing the whole sequence.

    Grouped-query attention: there are fewer key/value heads than query heads; each key/value head
    serves n_rep consecutive query heads (Llama 3.2 1B: 32 query heads, 8 kv heads, n_rep = 4), which
    shrinks the cache by n_rep.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        model_parallel_size = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // model_parallel_size
        self.n_local_kv_heads = args.n_kv_heads // model_parallel_size
        self.n_rep = args.n_rep
        self.head_dim = args.head_dim
        q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        # Column-parallel: each process computes a slice of the heads. Row-parallel: each process
        # projects its heads back to `dim`, and fairscale sums the partial results.
        self.wq = ColumnParallelLinear(args.dim, q_width, gather_output=False)
        self.wk = ColumnParallelLinear(args.dim, kv_width, gather_output=False)
        self.wv = ColumnParallelLinear(args.dim, kv_width, gather_output=False)
        self.wo = RowParallelLinear(q_width, args.dim)
        # Buffers (so `.to()` moves and casts them) but not persistent (they are not in checkpoints).
        # Heads before positions: each head's cached keys form one (position, head_dim) block, the
        # layout the attention products read, so a step reads the cache where it lies. Meta's
        # (batch, position, head, head_dim) layout needs a copy of the whole cache into this one at
        # every step (README, "Intel Xeon with AMX", measured the difference on one CPU).
        cache_shape = (args.max_batch_size, self.n_local_kv_heads, args.max_seq_len, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(cache_shape), persistent=False)

    def forward(
        self,
        x: torch.Tensor,  # (batch, seq, dim)
        start_pos: int,
        cos: torch.Tensor,  # (seq, head_dim/2)
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],  # (seq, kv_len) bool, or None for a single token
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # values carry no position

        # Write this call's keys/values at their positions, then read everything so far.
        end_pos = start_pos + seq
        self.cache_k[:batch, :, start_pos:end_pos] = k.transpose(1, 2)  # (batch, n_kv_heads, seq, head_dim)
        self.cache_v[:batch, :, start_pos:end_pos] = v.transpose(1, 2)
        keys = self.cache_k[:batch, :, :end_pos]  # (batch, n_kv_heads, kv_len, head_dim)
        values = self.cache_v[:batch, :, :end_pos]

        q = q.transpose(1, 2)  # (batch, n_heads, seq, head_dim)

        # Attention, for every head:   softmax(q @ keys^T / sqrt(head_dim), masked) @ values
        # - each new token's score against every cached key, scaled by 1/sqrt(head_dim) so that the
        #   scores' spread does not grow with the head size;
        # - masked: a key after the token (mask False) gets score -inf, so weight 0 after softmax;
        # - the kernel takes the softmax in float32: exponentials of bfloat16 scores would round coarsely;
        # - grouped-query: query head i uses key/value head i // n_rep.
        # `attention` (products.py) computes exactly this with the fastest of its candidates, timed
        # as the matrices' are: F.scaled_dot_product_attention, whose fused CPU kernel works block by
        # block, never holds the (seq x kv_len) scores and copies no key/value head (Meta's code
        # repeats each n_rep times), and float32 variants, which pay where the CPU has no bfloat16
        # arithmetic (a decode step's one query row above all).
        # Where no fused kernel fits (some GPU cases) PyTorch computes the scores whole, which is why
        # run_inference.py prefills in chunks. Its `last_layer_attention` writes the same
        # computation out step by step.
        out = attention(q, keys, values, mask)
        # out: (batch, n_heads, seq, head_dim) in q's dtype
        out = out.transpose(1, 2)  # (batch, seq, n_heads, head_dim)
        return self.wo(out.reshape(batch, seq, self.n_local_heads * self.head_dim))  # (batch, seq, dim)


# ------------------------------------------------------------------------------------------------
# Feed-forward (SwiGLU)
# ------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """w2( silu(w1 x) * w3 x ): a gated MLP. w1 decides how much of each hidden unit of w3 passes."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = ColumnParallelLinear(args.dim, args.ffn_hidden_dim, gather_output=False)
        self.w3 = ColumnParallelLinear(args.dim, args.ffn_hidden_dim, gather_output=False)
        self.w2 = RowParallelLinear(args.ffn_hidden_dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, dim) -> same
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # hidden: (batch, seq, ffn_hidden_dim)


# ------------------------------------------------------------------------------------------------
# The transformer
# ------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm residual block: each sub-layer reads a normalised copy and adds its result back."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, cos, sin, mask):  # (batch, seq, dim) -> same
        # h, the residual stream between the two sub-layers, is no module's output: a forward
        # pre-hook on ffn_norm sees it.
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """`model(tokens, start_pos)` -> float32 logits (batch, seq, vocab) for every position.

    Prefill: call once with the whole prompt and start_pos=0. Decode: call with one new token per
    sequence, (batch, 1), and start_pos = the number of tokens already in the cache.

    The call is two steps that can also be taken one at a time: `hidden_states` runs the layers
    (and fills the KV cache), `logits` scores the vocabulary. A prefill needs the scores of the last
    prompt position only, and the (vocab x dim) output layer over every position is about a fifth
    of a 1B prefill, so run_inference.py's prefill calls `logits` on that one position.

    Build it under `torch.device(...)` and with `torch.set_default_dtype(...)` to choose where the
    KV cache lives and its dtype; `llama_models.llama3.checkpoint.load_llama` does this for you.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size)  # gathers every process's vocabulary slice
        if args.stored_scheme:  # a folder written by `python -m llama_models.quantize`: 8- or 4-bit matrices
            hold_quantized_weights(self, args.stored_scheme, args.group_size)
        # A plain attribute, not a buffer: `model.to(torch.bfloat16)` must not round the angles.
        self.rope_cos, self.rope_sin = rope_cos_sin(args)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.logits(self.hidden_states(tokens, start_pos))  # (batch, seq, vocab)

    @torch.inference_mode()
    def hidden_states(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """The residual stream after the last layer, before the final norm.   # (batch, seq, dim)

        In inference mode (no autograd records): its tensors, and those its forward hooks see, can be
        read and copied outside it but not changed in place."""
        batch, seq = tokens.shape
        self._check_fits_cache(batch, seq, start_pos)
        self._check_token_ids(tokens)
        h = self.tok_embeddings(tokens)  # (batch, seq, dim)

        if self.rope_cos.device != h.device:  # first call after the model moved device
            self.rope_cos, self.rope_sin = self.rope_cos.to(h.device), self.rope_sin.to(h.device)
        cos = self.rope_cos[start_pos : start_pos + seq]  # (seq, head_dim/2)
        sin = self.rope_sin[start_pos : start_pos + seq]
        # A single new token may attend to everything cached, so decode steps need no mask.
        mask = causal_mask(seq, start_pos, h.device) if seq > 1 else None

        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        return h

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token scores from hidden states: (..., dim) -> float32 (..., vocab)."""
        return self.output(self.norm(h)).float()

    def _check_fits_cache(self, batch: int, seq: int, start_pos: int):
        if start_pos < 0:
            raise LlamaError(f"start_pos={start_pos}: it is the number of positions already in the KV cache, 0 or more")
        if start_pos + seq > self.args.max_seq_len:
            raise LlamaError(
                f"positions {start_pos}..{start_pos + seq - 1} do not fit the KV cache of "
                f"max_seq_len={self.args.max_seq_len}: shorten the prompt or load with a larger max_seq_len"
            )
        if batch > self.args.max_batch_size:
            raise LlamaError(
                f"batch of {batch} sequences exceeds max_batch_size={self.args.max_batch_size}: "
                "load with a larger max_batch_size"
            )

    def _check_token_ids(self, tokens: torch.Tensor):
        # The embedding would read an id outside the vocabulary as a row of zeros, and go on silently.
        if tokens.device.type == "meta":  # shapes only: no ids to read
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.args.vocab_size:
            raise LlamaError(f"token id {low if low < 0 else high} is outside the vocabulary (0 to "
                             f"{self.args.vocab_size - 1}): give ids the tokenizer made")
