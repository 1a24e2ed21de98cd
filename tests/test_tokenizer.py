"""Tests of the Llama 3 tokenizer.

Most tests use a tiny byte-level tokenizer file (token i is byte i), where the expected ids
follow from the UTF-8 bytes of the text. Tests marked "real" use Meta's tokenizer.model and
check it against the values Meta's own tests use; they are skipped when that file is absent.
"""

import base64
import itertools

import pytest

from llama_models.llama3.tokenizer import (
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    StreamingDecoder,
    Tokenizer,
    split_long_runs,
)
from tokenizer_files import HELLO_MERGES, real_tokenizer_or_skip, write_byte_level_tokenizer

ROUND_TRIP_TEXTS = [
    "This is a test sentence.",
    "",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "🦙",
    "世界你好",
    "héllo, naïve café, Ångström",
    "def f(x):\n    return x ** 2  # 😀\n",
]

# In the byte-level test tokenizer, the special tokens come right after the 256 byte tokens.
BYTE_BOS, BYTE_EOS, BYTE_EOT = 256, 257, 265


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte") / "tokenizer.model"
    return Tokenizer(write_byte_level_tokenizer(path))


@pytest.fixture(scope="module")
def real_tokenizer():
    return real_tokenizer_or_skip()


def encode_plain(tokenizer, text):
    return tokenizer.encode(text, bos=False, eos=False)


# --- Vocabulary and special tokens ------------------------------------------------------------


def test_special_tokens_follow_the_base_tokens(byte_tokenizer):
    assert byte_tokenizer.n_words == 256 + 256
    assert sorted(byte_tokenizer.special_tokens.values()) == list(range(256, 512))
    assert byte_tokenizer.bos_id == BYTE_BOS
    assert byte_tokenizer.eos_id == BYTE_EOS
    assert byte_tokenizer.eot_id == BYTE_EOT


def test_real_special_token_ids(real_tokenizer):
    special = real_tokenizer.special_tokens
    assert real_tokenizer.n_words == 128256
    assert len(special) == 256
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|step_id|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|image|>": 128011,
        "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }
    for name, token_id in expected.items():
        assert special[name] == token_id, name


def test_real_bos_eos_pad_and_stop_tokens(real_tokenizer):
    assert real_tokenizer.bos_id == 128000
    assert real_tokenizer.eos_id == 128001
    assert real_tokenizer.pad_id == 128004
    assert real_tokenizer.eom_id == 128008
    assert real_tokenizer.eot_id == 128009
    assert set(real_tokenizer.stop_tokens) == {128001, 128008, 128009}


# --- Encoding and decoding --------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_byte_level_tokens_are_the_utf8_bytes(byte_tokenizer, text):
    tokens = encode_plain(byte_tokenizer, text)
    assert tokens == list(text.encode("utf-8"))
    assert byte_tokenizer.decode(tokens) == text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_real_round_trip(real_tokenizer, text):
    assert real_tokenizer.decode(encode_plain(real_tokenizer, text)) == text


def test_merges_are_applied(tmp_path):
    path = write_byte_level_tokenizer(tmp_path / "tokenizer.model", merges=HELLO_MERGES)
    tokenizer = Tokenizer(path)
    hello = 256 + HELLO_MERGES.index(b"hello")
    # " hello" is one pre-token: the space stays a byte of its own, "hello" merges fully.
    assert encode_plain(tokenizer, "hello hello") == [hello, ord(" "), hello]
    assert tokenizer.decode([hello]) == "hello"
    assert tokenizer.bos_id == 256 + len(HELLO_MERGES)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("This is a test sentence.", [2028, 374, 264, 1296, 11914, 13]),
        ("\n\n", [271]),
        ("user", [882]),
        ("assistant", [78191]),
        ("system", [9125]),
        ("ipython", [23799, 4690]),
    ],
)
def test_real_sanity_vectors(real_tokenizer, text, expected):
    assert encode_plain(real_tokenizer, text) == expected


def test_bos_and_eos_are_added_by_id(byte_tokenizer):
    assert byte_tokenizer.encode("hi", bos=True, eos=False) == [BYTE_BOS, ord("h"), ord("i")]
    assert byte_tokenizer.encode("hi", bos=False, eos=True) == [ord("h"), ord("i"), BYTE_EOS]
    assert byte_tokenizer.encode("", bos=True, eos=True) == [BYTE_BOS, BYTE_EOS]


def test_real_bos_and_eos(real_tokenizer):
    tokens = real_tokenizer.encode("This is a test sentence.", bos=True, eos=True)
    assert tokens == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]


@pytest.mark.parametrize("text", ["<|eot_id|>", "<|begin_of_text|>", "a<|end_of_text|>b"])
def test_special_token_text_is_plain_text(byte_tokenizer, text):
    tokens = encode_plain(byte_tokenizer, text)
    assert tokens == list(text.encode("utf-8"))
    assert byte_tokenizer.decode(tokens) == text


@pytest.mark.parametrize("text", ["<|eot_id|>", "<|begin_of_text|>"])
def test_real_special_token_text_is_plain_text(real_tokenizer, text):
    tokens = encode_plain(real_tokenizer, text)
    assert all(token < 128000 for token in tokens)
    assert real_tokenizer.decode(tokens) == text


def test_real_eot_text_is_seven_ordinary_tokens(real_tokenizer):
    assert len(encode_plain(real_tokenizer, "<|eot_id|>")) == 7


def test_allowed_special_text_becomes_the_special_token(byte_tokenizer):
    text = "<|eot_id|>"
    assert byte_tokenizer.encode(text, bos=False, eos=False, allowed_special={text}) == [BYTE_EOT]
    assert byte_tokenizer.encode(text, bos=False, eos=False, allowed_special="all") == [BYTE_EOT]
    # Allowing one special token leaves the others as text.
    other = "<|begin_of_text|>"
    tokens = byte_tokenizer.encode(other, bos=False, eos=False, allowed_special={text})
    assert tokens == list(other.encode("utf-8"))


def test_special_tokens_decode_to_their_names(byte_tokenizer):
    assert byte_tokenizer.decode([BYTE_BOS, ord("h"), ord("i"), BYTE_EOT]) == (
        "<|begin_of_text|>hi<|eot_id|>"
    )


def test_decode_replaces_invalid_utf8(byte_tokenizer):
    llama_bytes = "🦙".encode("utf-8")
    assert byte_tokenizer.decode(list(llama_bytes[:2])) == "\ufffd"
    assert byte_tokenizer.decode([0xFF, ord("a")]) == "\ufffda"


def test_real_llama_emoji_is_three_tokens_invalid_alone(real_tokenizer):
    tokens = encode_plain(real_tokenizer, "🦙")
    assert len(tokens) == 3
    assert all(real_tokenizer.decode([token]) == "\ufffd" for token in tokens)


# --- token_bytes ------------------------------------------------------------------------------


def test_token_bytes(byte_tokenizer):
    assert byte_tokenizer.token_bytes(ord("A")) == b"A"
    assert byte_tokenizer.token_bytes(0xF0) == b"\xf0"
    assert byte_tokenizer.token_bytes(BYTE_EOT) == b"<|eot_id|>"


@pytest.mark.parametrize("token_id", [-1, 512])
def test_token_bytes_rejects_ids_outside_the_vocabulary(byte_tokenizer, token_id):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        byte_tokenizer.token_bytes(token_id)


def test_real_token_bytes(real_tokenizer):
    assert real_tokenizer.token_bytes(0) == b"!"  # rank 0 of the real file
    assert real_tokenizer.token_bytes(128009) == b"<|eot_id|>"
    text = "héllo 🦙 世界"
    pieces = [real_tokenizer.token_bytes(t) for t in encode_plain(real_tokenizer, text)]
    assert b"".join(pieces) == text.encode("utf-8")


# --- Long inputs ------------------------------------------------------------------------------


def longest_run(text):
    """Length of the longest stretch of only-whitespace or only-non-whitespace characters."""
    return max((len(list(run)) for _, run in itertools.groupby(text, str.isspace)), default=0)


def test_split_long_runs_small_example():
    # Runs "aaaa", "  ", "bb" with a limit of 2: only "aaaa" is too long; the cut comes
    # after its first two characters.
    assert list(split_long_runs("aaaa  bb", max_run=2)) == ["aa", "aa  bb"]


def test_split_long_runs_leaves_short_text_alone():
    text = "short text " * 10
    assert list(split_long_runs(text)) == [text]


@pytest.mark.parametrize("char", ["x", " "])
def test_split_long_runs_cuts_a_30000_char_run(char):
    pieces = list(split_long_runs(char * 30_000))
    assert [len(piece) for piece in pieces] == [MAX_RUN_CHARS, 30_000 - MAX_RUN_CHARS]


def test_split_long_runs_keeps_every_run_within_the_limit():
    text = "ab " * 1000 + "x" * 70_000 + "\n" * 30_000 + "tail " + " " * 26_000 + "end"
    pieces = list(split_long_runs(text))
    assert "".join(pieces) == text
    assert all(longest_run(piece) <= MAX_RUN_CHARS for piece in pieces)
    assert longest_run(text) > MAX_RUN_CHARS  # the test would be empty otherwise


@pytest.mark.parametrize("char", ["x", " "])
def test_long_run_is_cut_before_tiktoken_and_round_trips(byte_tokenizer, char, monkeypatch):
    """tiktoken never sees a run longer than MAX_RUN_CHARS (its BPE slows down sharply on those)."""
    seen_pieces = []
    tiktoken_encode = byte_tokenizer.encoding.encode

    def watching_encode(piece, **kwargs):
        seen_pieces.append(piece)
        return tiktoken_encode(piece, **kwargs)

    monkeypatch.setattr(byte_tokenizer.encoding, "encode", watching_encode)
    text = char * 30_000
    tokens = encode_plain(byte_tokenizer, text)
    assert max(len(piece) for piece in seen_pieces) <= MAX_RUN_CHARS
    assert len(tokens) == 30_000  # one byte per character, one token per byte
    assert byte_tokenizer.decode(tokens) == text


@pytest.mark.parametrize("char", ["x", " "])
def test_real_long_run_round_trips(real_tokenizer, char):
    text = char * 30_000
    assert real_tokenizer.decode(encode_plain(real_tokenizer, text)) == text


def test_text_longer_than_one_window_round_trips(byte_tokenizer, monkeypatch):
    text = "hello world, ünïcode 🦙\n" * 20_000
    assert len(text) > MAX_ENCODE_CHARS

    # Watch what tiktoken is given: no call may see more than one window of text.
    seen_lengths = []
    tiktoken_encode = byte_tokenizer.encoding.encode

    def watching_encode(piece, **kwargs):
        seen_lengths.append(len(piece))
        return tiktoken_encode(piece, **kwargs)

    monkeypatch.setattr(byte_tokenizer.encoding, "encode", watching_encode)
    tokens = byte_tokenizer.encode(text, bos=True, eos=True)

    assert max(seen_lengths) <= MAX_ENCODE_CHARS
    assert sum(seen_lengths) == len(text)
    assert tokens[0] == BYTE_BOS and tokens[-1] == BYTE_EOS
    assert byte_tokenizer.decode(tokens[1:-1]) == text


# --- Streaming decoder ------------------------------------------------------------------------

STREAM_TEXT = "héllo 🦙 世界"


def stream(tokenizer, tokens):
    decoder = StreamingDecoder(tokenizer)
    pieces = [decoder.push(token) for token in tokens]
    return pieces, decoder.flush()


@pytest.mark.parametrize("tokenizer_fixture", ["byte_tokenizer", "real_tokenizer"])
def test_streaming_decoder_prints_whole_characters(request, tokenizer_fixture):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    pieces, rest = stream(tokenizer, encode_plain(tokenizer, STREAM_TEXT))
    assert "".join(pieces) + rest == STREAM_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some token held only part of a character and had to wait
    assert rest == ""


def test_streaming_decoder_flush_reports_an_unfinished_character(byte_tokenizer):
    decoder = StreamingDecoder(byte_tokenizer)
    first_two_bytes = "🦙".encode("utf-8")[:2]
    assert [decoder.push(byte) for byte in first_two_bytes] == ["", ""]
    assert decoder.flush() == "\ufffd"
    # After a flush the decoder starts afresh.
    assert decoder.push(ord("a")) == "a"


def test_streaming_decoder_passes_special_tokens_through(byte_tokenizer):
    decoder = StreamingDecoder(byte_tokenizer)
    assert decoder.push(BYTE_EOT) == "<|eot_id|>"


# --- Errors from reading the file -------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        Tokenizer(missing)
    assert str(missing) in str(error.value)


# Two good lines (bytes 0 and 1), then a bad third line.
GOOD_LINES = "AA== 0\nAQ== 1\n"


@pytest.mark.parametrize(
    "bad_line",
    ["Ag==", "Ag== two", "Ag== -2", "!!!! 2", "Ag== 2 extra", "Ag== " + "9" * 5000],
    ids=["no rank", "word rank", "negative rank", "bad base64", "extra field", "5000-digit rank"],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "tokenizer.model"
    path.write_text(GOOD_LINES + bad_line + "\n")
    with pytest.raises(ValueError, match="line 3") as error:
        Tokenizer(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("AA== 0\nAQ== 5\n", "ranks must be"),
        ("AA== 0\nAA== 1\n", "twice"),
        ("\n", "no tokens"),
    ],
    ids=["gap in ranks", "repeated token", "empty"],
)
def test_inconsistent_file_is_rejected(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        Tokenizer(path)


def test_a_file_without_every_single_byte_is_rejected(tmp_path):
    """One line changed to another token keeps the count right, but text with that byte has no
    tokens: refused when read, not by tiktoken's panic when some prompt holds the byte."""
    path = write_byte_level_tokenizer(tmp_path / "tokenizer.model", merges=HELLO_MERGES)
    lines = path.read_bytes().splitlines()
    lines[ord("a")] = base64.b64encode(b"zz") + b" %d" % ord("a")  # byte 'a' is a token no more
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match="no token for the byte b'a'"):
        Tokenizer(path)


def test_printable_escapes_what_a_terminal_would_act_on_and_keeps_line_breaks():
    from llama_models.llama3.tokenizer import printable

    assert printable("int main() {\r\n\treturn 0;\n}") == "int main() {\n\treturn 0;\n}"  # Windows' line ends
    assert printable("a\x1b[2Jb\rc\x00\x7f\x9b") == "a\\x1b[2Jb\\x0dc\\x00\\x7f\\x9b"
    assert printable("héllo 🦙 中文 e\u0301 \u2028") == "héllo 🦙 中文 e\u0301 \u2028"
