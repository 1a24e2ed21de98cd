"""Where the model runs and in which dtype: the names the scripts and load_llama take, checked here."""

from typing import Union

import torch

from .args import LlamaError

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished its queued work: GPUs run kernels after the call returns.
    (The CPU runs each before the call returns: nothing to wait for.)"""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
