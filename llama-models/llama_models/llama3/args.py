"""The shape of a Llama 3.x model: what `params.json` says, plus three numbers chosen at run time.

Meta ships every checkpoint with a small `params.json`, for example Llama 3.2 1B:

    {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
     "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05,
     "rope_theta": 500000.0, "use_scaled_rope": true}

`ModelArgs` holds those fields, the runtime `max_seq_len` / `max_batch_size` (they size the KV cache,
so they are chosen by whoever runs the model, not by the checkpoint) and `rope_scale_factor` (which
no params.json carries), and the quantities derived from them (head size, feed-forward width).
"""

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional


class LlamaError(Exception):
    """Input the user can fix: a bad folder, file, device or prompt. The message is one line that
    names the culprit and says what to do, so scripts print it instead of a traceback."""


def is_whole_number(value) -> bool:
    """An int, and not True or False (which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or a float that a float holds: not infinite or NaN (JSON reads both), not 10**400."""
    if not (is_whole_number(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a whole number beyond any float
        return False


def first_line(error: BaseException) -> str:
    """What went wrong, for one line of our own: the first line of an error from a library, or its
    kind where it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class ModelArgs:
    # --- from params.json -------------------------------------------------------------------------
    dim: int = 4096  # width of the residual stream (the "hidden size")
    n_layers: int = 32  # number of transformer blocks
    n_heads: int = 32  # query heads per attention layer
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None means n_heads
    vocab_size: int = 128256  # 128,000 BPE tokens + 256 special tokens
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # widens the feed-forward layer (1.3 for 8B/70B)
    norm_eps: float = 1e-5  # added inside RMSNorm's square root to avoid dividing by zero
    rope_theta: float = 500000.0  # base of the rotary position frequencies
    use_scaled_rope: bool = False  # Llama 3.1+ stretches low frequencies for a 128k context
    # Only in folders written by `python -m llama_models.quantize`: how the matrices are stored,
    # {"scheme": "int8"} or {"scheme": "int4", "group_size": 32} (see quantize.py). None: as trained.
    quantization: Optional[dict] = None
    # --- chosen at run time -----------------------------------------------------------------------
    max_seq_len: int = 2048  # longest prompt + answer the KV cache can hold
    max_batch_size: int = 1  # sequences decoded together (beam search uses one per beam)
    # Llama 3.1 RoPE scaling stretches long wavelengths by this factor. Meta's code hard-codes 8;
    # the 3.2 1B/3B models were trained with 32 (see `default_rope_scale_factor`). None = pick.
    rope_scale_factor: Optional[float] = None
    # --- derived in __post_init__ (not arguments) -------------------------------------------------
    head_dim: int = field(init=False)
    ffn_hidden_dim: int = field(init=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self._check_kinds()
        self._check_plausible_values()
        self._check_quantization()
        self._check_runtime_sizes()
        self._check_shapes()
        self.head_dim = self.dim // self.n_heads
        self.ffn_hidden_dim = feed_forward_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.rope_scale_factor is None:
            self.rope_scale_factor = default_rope_scale_factor(self.dim, self.n_layers)

    def _check_kinds(self):
        """Every size a positive whole number, every constant a positive number, the switch a boolean:
        a hand-edited params.json may say "128" or 128.0 or "false", which would fail later, or pass."""
        for name in WHOLE_NUMBER_FIELDS:
            value = getattr(self, name)
            if not is_whole_number(value) or value < 1:
                raise LlamaError(f"{name} is {value!r} in params.json: it must be a whole number of at least 1, "
                                 "as in Meta's file; download params.json again or correct it")
        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            if name == "ffn_dim_multiplier" and value is None:
                continue
            if not is_finite_number(value) or value <= 0:
                raise LlamaError(f"{name} is {value!r} in params.json: it must be a positive finite number, as in "
                                 "Meta's file; download params.json again or correct it")
        if not isinstance(self.use_scaled_rope, bool):
            raise LlamaError(f"use_scaled_rope is {self.use_scaled_rope!r} in params.json: it must be true or "
                             "false without quotes; download params.json again or correct it")

    def _check_quantization(self):
        """A folder of llama_models.quantize says {"scheme": "int8"} or {"scheme": "int4", "group_size": N};
        an int4 one without a group size gets the default here, so that every reader finds one."""
        from .quantize import GROUP_SIZE, INT4_GROUP_SIZES, STORED_SCHEMES  # here: quantize.py imports this module

        q = self.quantization
        if q is None:
            return
        scheme = q.get("scheme") if isinstance(q, dict) else None
        group_size = q.get("group_size", GROUP_SIZE) if scheme == "int4" else None
        allowed_keys = {"scheme", "group_size"} if scheme == "int4" else {"scheme"}
        if (scheme not in STORED_SCHEMES or not set(q) <= allowed_keys
                or (scheme == "int4" and (type(group_size) is not int or group_size not in INT4_GROUP_SIZES))):
            sizes = ", ".join(map(str, INT4_GROUP_SIZES))
            raise LlamaError(f"quantization is {q!r} in params.json: llama_models.quantize writes "
                             f'{{"scheme": "int8"}} or {{"scheme": "int4", "group_size": N}} (N one of {sizes}); '
                             "restore the params.json it wrote, or quantize the checkpoint again")
        if scheme == "int4":
            self.quantization = {"scheme": "int4", "group_size": group_size}

    def _check_runtime_sizes(self):
        """max_seq_len, max_batch_size and rope_scale_factor come from whoever runs the model, not
        from params.json."""
        for name in ("max_seq_len", "max_batch_size"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 1:
                raise LlamaError(f"{name}={value!r}: the KV cache's size must be a whole number of at least 1")
        factor = self.rope_scale_factor
        if factor is not None and (not is_finite_number(factor) or factor < 1):
            raise LlamaError(f"rope_scale_factor={factor!r}: it must be a finite number of at least 1 (1: no "
                             "stretching), or None for the model's own (default_rope_scale_factor)")

    def _check_plausible_values(self):
        """Sizes far beyond any Llama's would only overflow PyTorch's sizes or take hours to build;
        a rope_theta of 1 or less would give NaN angles.
        The bounds leave room for models much larger than 405B (dim 16384, 126 layers, 128 heads,
        128256 tokens, ffn_dim_multiplier 1.2, multiple_of 4096)."""
        for name, most in (("dim", 2**20), ("n_layers", 2**12), ("n_heads", 2**14), ("vocab_size", 2**24),
                           ("multiple_of", 2**20), ("ffn_dim_multiplier", 64)):
            value = getattr(self, name)
            if value is not None and value > most:
                raise LlamaError(f"{name} is {value!r} in params.json, far beyond any Llama's (at most {most} here): "
                                 "download params.json again or correct it")
        if self.rope_theta <= 1:  # the rotation frequencies theta**(-2i/head_dim) must fall, not overflow
            raise LlamaError(f"rope_theta is {self.rope_theta!r} in params.json: it must be above 1 (Llama 3's is "
                             "500000.0); download params.json again or correct it")

    def _check_shapes(self):
        if self.dim % self.n_heads != 0:
            raise LlamaError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}: check params.json")
        if self.n_heads % self.n_kv_heads != 0:
            raise LlamaError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}: check params.json"
            )

    @classmethod
    def from_params(cls, params: dict, **runtime) -> "ModelArgs":
        """Build from the dict in `params.json`, plus runtime fields such as max_seq_len=512.

        Fields we do not use are ignored, and so are the runtime ones (a params.json that names
        max_seq_len does not size our cache), but checkpoints we cannot run are refused by name.
        """
        params = model_arguments(params)
        _refuse_unsupported(params)
        missing = [name for name in REQUIRED_FIELDS if name not in params]
        if missing:
            raise LlamaError(f"params.json has no {', '.join(missing)}: every Llama checkpoint's file names them; "
                             "download params.json again")
        known = {f.name for f in fields(cls) if f.init} - set(RUNTIME_FIELDS)
        return cls(**{key: value for key, value in params.items() if key in known}, **runtime)

    @classmethod
    def from_json_file(cls, path, **runtime) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise LlamaError(f"{path} not found: a Llama checkpoint folder must contain params.json")
        try:
            params = json.loads(path.read_text())
        except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, a 5,000-digit number, nested too deep
            raise LlamaError(f"{path} is not valid JSON ({first_line(error)}): download params.json again") from None
        if not isinstance(params, dict):
            raise LlamaError(f"{path} should hold a JSON object of model arguments: download it again")
        return cls.from_params(params, **runtime)

    @property
    def stored_scheme(self) -> Optional[str]:
        """How the checkpoint's matrices are stored: "int8" or "int4" (llama_models.quantize), or None."""
        return self.quantization["scheme"] if self.quantization else None

    @property
    def group_size(self) -> Optional[int]:
        """An int4 checkpoint's inputs per scale and zero point; None for any other."""
        return self.quantization.get("group_size") if self.quantization else None

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (4 for 8B and 1B, 8 for 70B)."""
        return self.n_heads // self.n_kv_heads

    @property
    def trained_context(self) -> int:
        """The longest text the model was trained on: 128k tokens for Llama 3.1 and later (scaled
        RoPE), 8k for the April 2024 Llama 3."""
        return 131072 if self.use_scaled_rope else UNSCALED_CONTEXT


UNSCALED_CONTEXT = 8192  # Llama 3's context, which Llama 3.1's RoPE scaling extends (model.py)
# The sizes every params.json of Meta's gives; without them the defaults above (8B's) would be
# taken, and the weights blamed for not matching.
REQUIRED_FIELDS = ("dim", "n_layers", "n_heads")
WHOLE_NUMBER_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")
NUMBER_FIELDS = ("ffn_dim_multiplier", "norm_eps", "rope_theta")
RUNTIME_FIELDS = ("max_seq_len", "max_batch_size", "rope_scale_factor")


def model_arguments(params: dict) -> dict:
    """The model's arguments in a params.json's object: a few files nest them under "model"."""
    arguments = params.get("model", params)
    if not isinstance(arguments, dict):
        raise LlamaError(f'"model" is {arguments!r} in params.json: it should hold the model\'s arguments as an '
                         "object; download params.json again")
    return arguments


def feed_forward_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Width of the SwiGLU feed-forward layer, derived exactly as Meta derives it.

    A classic MLP is 4*dim wide. SwiGLU has three matrices instead of two, so Meta keeps the parameter
    count level by taking 2/3 of that, then widens by ffn_dim_multiplier and rounds up to a multiple
    of `multiple_of` (friendly to GPU kernels). Llama 3.1 8B: 16384 -> 10922 -> 14198 -> 14336.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def default_rope_scale_factor(dim: int, n_layers: int) -> float:
    """32 for the Llama 3.2 1B and 3B shapes, 8 for every other Llama 3.x model.

    params.json carries no scale factor. Meta's code always uses 8, but the 3.2 1B/3B models were
    trained with 32 (Meta confirmed it; with 8 they degrade past ~80k tokens). Short prompts barely
    notice either way. Override with ModelArgs(rope_scale_factor=...).
    """
    is_llama32_small = (dim, n_layers) in {(2048, 16), (3072, 28)}
    return 32.0 if is_llama32_small else 8.0


def _refuse_unsupported(params: dict):
    """Quantized and vision checkpoints have extra tensors and layers this text-only model lacks."""
    if params.get("quantization_args") or params.get("lora_args"):
        raise LlamaError(
            "this is a quantized checkpoint (params.json has quantization_args/lora_args), "
            "which llama_models does not run: download the bf16 version of the model"
        )
    vision_keys = [key for key in params if key.startswith("vision_")]
    if vision_keys:
        raise LlamaError(
            f"this is a vision checkpoint (params.json has {vision_keys[0]}), "
            "which llama_models does not run: use a Llama 3.x text model"
        )
