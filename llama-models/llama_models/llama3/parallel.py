"""torch.distributed and fairscale: the processes that share one model, started, checked and closed.

A plain `python script.py` is a group of one process; under `torchrun` each of N processes holds
1/N of every matrix (which slice: sharding.py) and they add up their partial results at every layer.
"""

import atexit
import contextlib
import io
import os

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fairscale_parallel

from .args import LlamaError

OPENED_HERE = set()  # "group", "fairscale": what init_model_parallel started, which end_model_parallel closes


def init_model_parallel(device: torch.device) -> torch.device:
    """Start torch.distributed and fairscale's model parallelism, unless someone already has.

    fairscale's layers ask "which process am I, and how many share the model?" even when the answer
    is "one of one", so a process group must exist. `torchrun` sets RANK, WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT and we join its group; a plain `python script.py` gets a group of one, whose
    rendezvous is an in-memory store (no network port). NCCL talks between CUDA GPUs; gloo works
    everywhere else.

    Returns the device this process computes on: "cuda" becomes the GPU numbered by torchrun's
    LOCAL_RANK, so that the processes on one machine use one GPU each.
    """
    check_process_numbers()
    device = _device_for_this_process(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL communicates from the current GPU
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            check_rendezvous_variables()
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        OPENED_HERE.add("group")
        atexit.register(end_model_parallel)  # we opened it, so we close it, even if the caller does not
    if not fairscale_parallel.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints three banner lines
            fairscale_parallel.initialize_model_parallel(dist.get_world_size())
        OPENED_HERE.add("fairscale")
    return device


def check_process_numbers() -> None:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK, where set, are process numbers."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        value = os.environ.get(name, "0")
        if not (value.isascii() and value.isdigit()):
            raise LlamaError(f"the environment variable {name}={value!r} is not a process number: torchrun sets "
                             "it; unset it to run one process (or start the script with torchrun)")


def check_rendezvous_variables() -> None:
    """RANK comes with the rest of what torch.distributed reads to start a group from the environment
    (a caller who started the group another way needs none of them)."""
    missing = [name for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise LlamaError(f"the environment variable RANK is set but not {' and '.join(missing)}: torchrun sets them "
                         "all; unset RANK to run one process (or start the script with torchrun)")


def _device_for_this_process(device: torch.device) -> torch.device:
    """Under torchrun, "cuda" means the GPU numbered by this process's LOCAL_RANK."""
    n_processes = int(os.environ.get("WORLD_SIZE", 1))
    if n_processes > 1 and device.type == "mps":
        raise LlamaError("several processes cannot share an MPS device (gloo cannot send MPS tensors): use 'cpu'")
    if device.type != "cuda":
        return device
    if device.index is not None and n_processes > 1:
        raise LlamaError(f"device {str(device)!r} would put every process on one GPU: under torchrun use 'cuda'")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.index is None and local_rank >= torch.cuda.device_count():
        raise LlamaError(
            f"process {local_rank} on this machine needs GPU {local_rank}, but there are "
            f"{torch.cuda.device_count()}: start at most that many processes per machine"
        )
    return device if device.index is not None else torch.device("cuda", local_rank)


def end_model_parallel() -> None:
    """Close torch.distributed at the end of a run, in every process: what init_model_parallel
    opened (a group the caller started stays theirs to close).

    A process that exits with its group still open can abort ("terminate called without an active
    exception") while the other processes are closing their connections to it, and torchrun then
    reports the run as failed: 7 of 12 two-process gloo runs did so in one trial (a 2-core AMD
    EPYC), none after this call.
    `init_model_parallel` registers this to run at exit when it opened the group, so a program need
    not call it; calling it earlier frees the group sooner, and a second call does nothing.
    Models built before cannot run afterwards: fairscale's layers look up the group at every call.
    """
    if "fairscale" in OPENED_HERE and fairscale_parallel.model_parallel_is_initialized():
        fairscale_parallel.destroy_model_parallel()
    if "group" in OPENED_HERE and dist.is_initialized():
        dist.destroy_process_group()
    OPENED_HERE.clear()


def model_parallel_rank_and_size() -> tuple[int, int]:
    return fairscale_parallel.get_model_parallel_rank(), fairscale_parallel.get_model_parallel_world_size()


def is_main_process() -> bool:
    """True in the one process that should print: rank 0 under torchrun, or a process on its own."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def every_process_or_none(what: str):
    """Run a step that only some processes may fail (each reads its own shard), and then let every
    process know whether all succeeded: where one fails, the others stop with one line naming
    `what`, instead of a traceback about a closed connection at their next collective operation."""
    try:
        yield
    except Exception:
        with contextlib.suppress(RuntimeError):  # the others may be gone: this process's own error is what matters
            _all_processes_succeeded(False)
        raise
    if not _all_processes_succeeded(True):
        raise LlamaError(f"another process could not {what} (its own line says why)")


def _all_processes_succeeded(succeeded: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return succeeded
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(succeeded)], device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Overwrite `tokens` in every process with rank 0's values, and return it.

    All processes must feed the model the same tokens, or their slices stop fitting together. The
    output layer gathers the same logits, bit for bit, in every process, so greedy decoding picks
    the same token everywhere, and so does sampling with a generator seeded alike in every process:
    run_inference.py needs no broadcast. This is for code of your own that chooses tokens another
    way (a random seed per process, input read by one process). With NCCL, `tokens` must be on the
    process's GPU.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tokens, src=0)
    return tokens
