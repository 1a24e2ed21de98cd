"""The Llama 3 tokenizer: text <-> token ids.

Llama 3 uses byte-level BPE (byte pair encoding) run by OpenAI's `tiktoken` library:

1. A regular expression (PRE_TOKENIZER_PATTERN) cuts the text into pieces: words with their
   leading space, groups of up to three digits, runs of punctuation, runs of whitespace.
2. Each piece is turned into UTF-8 bytes, and BPE merges adjacent byte sequences into the
   longest known tokens, guided by the ranks in `tokenizer.model` (a lower rank merges first).

The vocabulary has two parts: the base tokens from `tokenizer.model` (128,000 in the real
file), whose id is their rank, and 256 special tokens such as <|begin_of_text|> that follow
right after them. Special tokens are never produced from ordinary text (see `Tokenizer.encode`);
code inserts them by id.
"""

import base64
import binascii
import codecs
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import AbstractSet, Literal

import tiktoken

# How text is cut into pieces before BPE. Left to right, the alternatives match: English
# contractions ('s, 're, ...); a word with at most one leading non-letter (usually a space);
# numbers, three digits at a time; punctuation with an optional leading space and any newlines
# after it; newlines with the whitespace before them; whitespace that is not followed by a
# non-space (so a word keeps one leading space); and any other whitespace.
PRE_TOKENIZER_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

NUM_SPECIAL_TOKENS = 256

# The special tokens with a job, in id order (the first gets id n_base_tokens). The names are
# those of llama-models since Llama 3.2, which named 128011 <|image|>; the remaining slots are
# reserved_special_token_2, 3, ...
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",  # BOS: starts every prompt
    "<|end_of_text|>",  # EOS: a base model ends its text with it
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # padding
    "<|step_id|>",
    "<|start_header_id|>",  # opens a chat message header: <|start_header_id|>user<|end_header_id|>
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model called a tool and waits for its result
    "<|eot_id|>",  # end of turn: the model has finished its reply
    "<|python_tag|>",  # starts a tool call / code
    "<|image|>",  # stands for an image in the vision models (Llama 3.2)
)

# tiktoken can crash (a Rust panic) on very long inputs, so text is encoded in windows of at
# most this many characters.
MAX_ENCODE_CHARS = 400_000

# BPE slows down sharply on a very long piece without spaces (or of only spaces), see
# https://github.com/openai/tiktoken/issues/195. Cutting such runs keeps encoding fast.
MAX_RUN_CHARS = 25_000


def special_token_names() -> list[str]:
    """The names of all 256 special tokens, in id order."""
    first_reserved = 2  # reserved_special_token_0 and _1 are among the named tokens
    num_reserved = NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)
    reserved = [
        f"<|reserved_special_token_{first_reserved + i}|>" for i in range(num_reserved)
    ]
    return list(NAMED_SPECIAL_TOKENS) + reserved


def load_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a `tokenizer.model` file into a dict that maps token bytes to their rank.

    Each line of the file is `<token bytes in base64> <rank>`, for example `IQ== 0` says the
    token b"!" has rank 0. The ranks must be 0, 1, ..., n-1, each used once, because a base
    token's id is its rank and the special tokens take the ids right after them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path}. Pass the path of the tokenizer.model file "
            "that comes with the Llama 3 checkpoint download."
        )
    ranks: dict[bytes, int] = {}
    with path.open("rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue  # tolerate blank lines, e.g. at the end of the file
            token, rank = _parse_rank_line(line, path, line_number)
            if token in ranks:
                raise ValueError(f"{path}, line {line_number}: token {token!r} appears twice")
            ranks[token] = rank
    _check_ranks_are_contiguous(ranks, path)
    _check_every_byte_is_a_token(ranks, path)
    return ranks


def _parse_rank_line(line: bytes, path: Path, line_number: int) -> tuple[bytes, int]:
    """Parse one `<base64> <rank>` line of a tokenizer file."""
    fields = line.split()
    where = f"{path}, line {line_number}"
    if len(fields) != 2:
        raise ValueError(f"{where}: expected '<base64 token> <rank>', got {_excerpt(line)}")
    encoded_token, rank_text = fields
    try:
        token = base64.b64decode(encoded_token, validate=True)
    except binascii.Error as error:
        raise ValueError(f"{where}: token is not valid base64: {_excerpt(encoded_token)}") from error
    if not rank_text.isdigit() or len(rank_text) > 9:  # Python refuses to read 4,300 digits and more
        raise ValueError(f"{where}: rank is not a non-negative integer below 10**9: {_excerpt(rank_text)}")
    return token, int(rank_text)


def _excerpt(data: bytes, most: int = 40) -> str:  # a damaged file's line can be any length of anything
    return repr(data[:most]) + ("..." if len(data) > most else "")


def _check_ranks_are_contiguous(ranks: dict[bytes, int], path: Path) -> None:
    if not ranks:
        raise ValueError(f"{path}: the tokenizer file holds no tokens")
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(
            f"{path}: ranks must be 0 to {len(ranks) - 1}, each used once (one per token)"
        )


def _check_every_byte_is_a_token(ranks: dict[bytes, int], path: Path) -> None:
    """Byte-level BPE starts every piece of text as single bytes: without one of the 256, text
    holding that byte has no tokens (tiktoken would panic)."""
    missing = [value for value in range(256) if bytes([value]) not in ranks]
    if missing:
        raise ValueError(f"{path}: no token for the byte {bytes([missing[0]])!r} ({len(missing)} of the 256 "
                         "single bytes missing), which every byte-level tokenizer has")


def split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Cut `text` into consecutive pieces so that none holds more than `max_run` whitespace
    characters in a row, or more than `max_run` non-whitespace characters in a row.

    The pieces joined together give back `text`. A cut falls inside an over-long run, so the
    tokens at that spot may differ from those of the uncut text; the decoded text is the same.
    """
    if len(text) <= max_run:
        yield text  # too short to hold an over-long run; skips the loop for most inputs
        return
    piece_start = 0
    run_length = 0
    run_is_space = None
    for index, char in enumerate(text):
        is_space = char.isspace()
        if is_space == run_is_space:
            run_length += 1
        else:  # a new run starts here
            run_is_space = is_space
            run_length = 1
        if run_length > max_run:
            yield text[piece_start:index]
            piece_start = index
            run_length = 1  # this character starts the run again in the next piece
    yield text[piece_start:]


def split_for_encoding(text: str) -> Iterator[str]:
    """Cut `text` into pieces tiktoken can encode safely and quickly (see MAX_ENCODE_CHARS
    and MAX_RUN_CHARS). Empty text gives no pieces."""
    for window_start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[window_start : window_start + MAX_ENCODE_CHARS]
        yield from split_long_runs(window)


class Tokenizer:
    """Turns text into Llama 3 token ids and back.

    Attributes:
        encoding: the underlying `tiktoken.Encoding`.
        n_base_tokens: number of ordinary (BPE) tokens, as many as `tokenizer.model` holds.
        n_words: vocabulary size: base tokens plus the 256 special tokens (128,256 for Llama 3).
        special_tokens: special token name (e.g. "<|eot_id|>") -> id.
        bos_id, eos_id, eot_id, eom_id, pad_id: ids of frequently used special tokens.
        stop_tokens: generation stops when the model produces any of these ids.
    """

    def __init__(self, model_path: str | Path):
        mergeable_ranks = load_bpe_ranks(model_path)
        self.n_base_tokens = len(mergeable_ranks)
        self.special_tokens = {
            name: self.n_base_tokens + index
            for index, name in enumerate(special_token_names())
        }
        self.n_words = self.n_base_tokens + NUM_SPECIAL_TOKENS
        self.encoding = tiktoken.Encoding(
            name=Path(model_path).name,
            pat_str=PRE_TOKENIZER_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )

        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        # A base model ends with <|end_of_text|>; an instruct model ends its turn with
        # <|eot_id|>, or with <|eom_id|> when it waits for a tool's result.
        self.stop_tokens = frozenset({self.eos_id, self.eom_id, self.eot_id})

    def encode(
        self,
        text: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: AbstractSet[str] | Literal["all"] = frozenset(),
    ) -> list[int]:
        """Encode `text` into token ids.

        Args:
            text: the text to encode.
            bos: put <|begin_of_text|> first.
            eos: put <|end_of_text|> last.
            allowed_special: names of special tokens whose text in `text` should become the
                special token ("all" for every one). By default none: text such as
                "<|eot_id|>" typed by a user is encoded as ordinary characters, so user input
                cannot end a turn or fake a chat header.
        """
        tokens = [self.bos_id] if bos else []
        for piece in split_for_encoding(text):
            # disallowed_special=() because tiktoken would otherwise raise an error on
            # special-token text that is not in allowed_special; we want it encoded as text.
            tokens.extend(
                self.encoding.encode(
                    piece, allowed_special=allowed_special, disallowed_special=()
                )
            )
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        """Turn token ids back into text. Special tokens become their names.

        Bytes that are not valid UTF-8 (for example a multi-byte character cut off at the end)
        become U+FFFD, the replacement character "�".
        """
        return self.encoding.decode_bytes(tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token, as stored in `tokenizer.model` (for a special token,
        its name in UTF-8). Useful to show what a token is: a token may hold only part of a
        character, so its bytes can be invalid UTF-8 on their own."""
        if not 0 <= token_id < self.n_words:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary (0 to {self.n_words - 1})"
            )
        return self.encoding.decode_single_token_bytes(token_id)


# Control characters in generated text (a random or confused model writes them) would act on a
# terminal: ESC begins a sequence that can reconfigure it, a carriage return overwrites the line.
CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in [*range(32), *range(127, 160)] if chr(code) not in "\n\t"}


def printable(text: str) -> str:
    """Text for a terminal: control characters shown escaped ("\\x1b"), line breaks (also Windows'
    \\r\\n, which code comes with) and tabs kept."""
    return text.replace("\r\n", "\n").translate(CONTROL_CHARACTERS)


class StreamingDecoder:
    """Decodes tokens one at a time, e.g. to print a model's reply while it is generated.

    One token does not always hold whole characters: "🦙" is 4 bytes in UTF-8 and the Llama 3
    tokenizer spreads them over 3 tokens, none of which is valid UTF-8 alone. Decoding each
    token on its own would print "���". This class keeps the bytes of an unfinished character
    until the rest arrives, so the character comes out once, whole.

    Usage:
        decoder = StreamingDecoder(tokenizer)
        for token_id in generated_ids:
            print(printable(decoder.push(token_id)), end="", flush=True)
        print(printable(decoder.flush()))
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text completed by it (may be "")."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Return what is still buffered and start afresh. Bytes of a character that never
        got completed come out as U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
