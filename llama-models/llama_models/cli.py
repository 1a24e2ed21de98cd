"""What both tools (`python -m llama_models.reshard`, `python -m llama_models.quantize`) do alike:
refuse a destination they must not write, write a new folder that an error or a signal leaves as it
was found, and say what went wrong in one line."""

import argparse
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

from .llama3.args import LlamaError
from .llama3.checkpoint import find_checkpoint_files


# Writing a new folder: an error, a full disk, Ctrl-C, `kill` (SIGTERM) or a closed terminal (SIGHUP)
# leaves no half-written copy behind. (SIGKILL and power cuts cannot be caught: params.json is
# written last, so the loader refuses what they leave.)
KILL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Killed(BaseException):
    """SIGTERM or SIGHUP arrived. It unwinds the stack as Ctrl-C's KeyboardInterrupt does, so that
    new_folder cleans up; then run_tool ends the process by the same signal."""

    def __init__(self, number: int):
        super().__init__(number)
        self.number = number


@contextlib.contextmanager
def new_folder(dst: Path):
    """Make the folder `dst` (absent or empty, see check_destination) to write into. If anything goes
    wrong while writing, it is left as it was found: removed with any parents this made, or emptied."""
    top = dst  # the outermost folder this makes: dst, or a missing parent of it
    while not top.parent.exists():
        top = top.parent
    created = not dst.exists()
    try:
        dst.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        with signals_held():  # a second Ctrl-C must not stop the cleanup halfway
            if created:
                shutil.rmtree(top, ignore_errors=True)
            else:
                for path in dst.iterdir():
                    path.unlink()
        raise


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (where the OS can hold them)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *KILL_SIGNALS})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_tool(main: Callable[[], int]) -> None:
    """A tool's `python -m` entry. Ctrl-C raises KeyboardInterrupt, which main reports (exit 130);
    SIGTERM and SIGHUP raise Killed, and once new_folder has cleaned up, the process ends by that
    signal, as whoever sent it expects. A signal already ignored stays ignored (nohup ignores SIGHUP,
    so that a long run outlives its terminal)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in KILL_SIGNALS:
        if signal.getsignal(number) is signal.SIG_DFL:
            signal.signal(number, raise_killed)
    try:
        code = main()
    except Killed as killed:
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) may take no more lines
            print(f"error: stopped by {signal.Signals(killed.number).name}: what this run wrote is removed",
                  file=sys.stderr)
        signal.signal(killed.number, signal.SIG_DFL)
        os.kill(os.getpid(), killed.number)
        code = 128 + killed.number  # where the signal is not fatal after all
    sys.exit(code)


def raise_killed(number: int, frame) -> None:
    raise Killed(number)


def refuse_under_torchrun(tool: str) -> None:
    if "RANK" in os.environ:  # torchrun: every process would write the same folder
        raise LlamaError(f"run python -m llama_models.{tool} as one process, not under torchrun: torchrun "
                         "then loads the folder it writes")


def check_destination(src: Path, dst: Path) -> None:
    """Refuse to write into the source checkpoint, or over anything that already exists."""
    if dst.resolve().is_relative_to(src.resolve()):
        raise LlamaError(
            f"{dst} is the source checkpoint folder or inside it: write the copy to a folder elsewhere"
        )
    if dst.is_dir() and any(path.suffix == ".partial" for path in dst.iterdir()):
        raise LlamaError(f"{dst} holds an unfinished copy (a run that was killed): delete {dst} and run again")
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise LlamaError(f"{dst} already exists and is not an empty folder: choose a new folder name")


class OneLineParser(argparse.ArgumentParser):
    """A command line parser whose errors are one line, as the tools' other errors are (argparse's
    own prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def note_if_instruct_is_dropped(src: Path, dst: Path, suffix: str) -> None:
    """run_inference.py picks the chat format by the folder's name: say so where a copy's name loses it."""
    source = find_checkpoint_files(src)
    source_name = source.model_name
    if source.named_instruct and "instruct" not in dst.name.lower():
        print(f"note: run_inference.py uses the chat format when a folder's name says Instruct, and {dst.name} "
              f"does not: rename it (e.g. {source_name.split('-mp')[0]}-{suffix}) or set IS_INSTRUCT = True")
