"""Tokenizer files for the tests.

`write_byte_level_tokenizer` makes a tiny but valid `tokenizer.model`, so the tokenizer code can
be tested without Meta's file. The real file is used where it is present: it lives outside the
repository (its license does not let us ship it), at ../shared/llama3/tokenizer.model.
"""

import base64
from collections.abc import Sequence
from pathlib import Path

from llama_models.llama3.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_TOKENIZER = REPO_ROOT.parent / "shared" / "llama3" / "tokenizer.model"

# Merges that let the tiny tokenizer encode "hello" as one token. Each one joins two tokens
# that exist before it: h+e, l+l, ll+o, he+llo. BPE can only reach a token that way.
HELLO_MERGES = (b"he", b"ll", b"llo", b"hello")


def write_byte_level_tokenizer(path: Path, merges: Sequence[bytes] = ()) -> Path:
    """Write a tokenizer file whose token i is the single byte i (for i < 256), followed by
    `merges` with ranks 256, 257, ... Without merges, a text encodes to its UTF-8 bytes:
    `encode("hi") == [ord("h"), ord("i")]`. Returns `path`."""
    tokens = [bytes([byte]) for byte in range(256)]
    for merge in merges:
        _check_reachable(merge, tokens)
        tokens.append(merge)
    with path.open("w", encoding="ascii") as file:
        for rank, token in enumerate(tokens):
            file.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    return path


def _check_reachable(merge: bytes, earlier_tokens: list[bytes]) -> None:
    """A merged token must be the concatenation of two earlier tokens, or BPE never builds it."""
    known = set(earlier_tokens)
    splits = ((merge[:cut], merge[cut:]) for cut in range(1, len(merge)))
    if not any(left in known and right in known for left, right in splits):
        raise ValueError(f"merge {merge!r} is not two earlier tokens joined together")


def real_tokenizer_or_skip() -> Tokenizer:
    """The real Llama 3 tokenizer, or skip the calling test when its file is absent."""
    import pytest  # only here: benchmarks/ imports this module's neighbours without pytest

    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"real Llama 3 tokenizer not found at {REAL_TOKENIZER}")
    return Tokenizer(REAL_TOKENIZER)
