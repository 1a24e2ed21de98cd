"""The independent implementation we check our math against: Hugging Face `LlamaForCausalLM`.

`hf_model_from_meta_checkpoint(folder)` reads a Meta checkpoint folder and builds the transformers
model with the same weights, converted to its layout:

* key names: `layers.0.attention.wq.weight` -> `model.layers.0.self_attn.q_proj.weight`, ...
* RoPE pairing: Meta rotates adjacent channels (0,1), (2,3), ...; transformers rotates channel j with
  j + head_dim/2. Permuting the rows of wq and wk inside each head (even rows first, then odd rows)
  makes the two conventions compute the same attention.
* Llama 3.1 RoPE scaling becomes `rope_parameters = {"rope_type": "llama3", ...}`.
"""

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

META_TO_HF_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def interleaved_to_half_split_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from (0, 1, 2, 3, ...) to (0, 2, 4, ..., 1, 3, 5, ...)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    per_head = weight.reshape(n_heads, head_dim // 2, 2, in_features)  # row 2j+c -> [j, c]
    return per_head.transpose(1, 2).reshape(out_features, in_features)


def hf_config(params: dict, tied: bool, rope_scale_factor: float) -> LlamaConfig:
    dim, n_heads = params["dim"], params["n_heads"]
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = -(-hidden // params["multiple_of"]) * params["multiple_of"]
    rope = {"rope_type": "default", "rope_theta": params["rope_theta"]}
    if params.get("use_scaled_rope"):
        rope = {
            "rope_type": "llama3",
            "rope_theta": params["rope_theta"],
            "factor": rope_scale_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return LlamaConfig(
        vocab_size=params["vocab_size"],
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=params["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=params.get("n_kv_heads", n_heads),
        rms_norm_eps=params["norm_eps"],
        max_position_embeddings=131072,  # Llama 3.1's context; only the RoPE setup reads it
        rope_parameters=rope,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def hf_state_dict(meta: dict, params: dict) -> dict:
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads", n_heads)
    hf = {"model.embed_tokens.weight": meta["tok_embeddings.weight"], "model.norm.weight": meta["norm.weight"]}
    hf["lm_head.weight"] = meta.get("output.weight", meta["tok_embeddings.weight"])
    for name, tensor in meta.items():
        if not name.startswith("layers."):
            continue
        _, index, rest = name.split(".", 2)
        if rest == "attention.wq.weight":
            tensor = interleaved_to_half_split_rows(tensor, n_heads)
        elif rest == "attention.wk.weight":
            tensor = interleaved_to_half_split_rows(tensor, n_kv_heads)
        hf[f"model.layers.{index}.{META_TO_HF_LAYER_KEYS[rest]}"] = tensor
    return hf


def hf_model_from_meta_checkpoint(
    folder: Path, dtype: torch.dtype = torch.float32, rope_scale_factor: float = 8.0
) -> LlamaForCausalLM:
    params = json.loads((folder / "params.json").read_text())
    meta = torch.load(folder / "consolidated.00.pth", weights_only=True)
    config = hf_config(params, tied="output.weight" not in meta, rope_scale_factor=rope_scale_factor)
    config._attn_implementation = "eager"  # the plain softmax(QK^T)V path, the easiest to trust
    model = LlamaForCausalLM(config)
    state = {name: tensor.to(dtype) for name, tensor in hf_state_dict(meta, params).items()}
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model.to(dtype).eval()
