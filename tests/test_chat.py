"""run_inference.py's chat (chapter 7b): a conversation that keeps its KV cache between turns.

A turn prefills only what it adds, which must give exactly what a prefill of the whole dialog from
scratch gives; /reset must give what a fresh start gives; a dialog that outgrows its context drops
its oldest exchanges and still answers. Then the script itself, fed messages on standard input.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run_inference.py is a script at the repository root
    sys.path.insert(0, str(REPO_ROOT))

import run_inference  # noqa: E402
from llama_models.llama3 import load_llama  # noqa: E402

NEW_TOKENS = 6


@pytest.fixture
def chat_settings(monkeypatch):
    monkeypatch.setattr(run_inference, "MAX_NEW_TOKENS", NEW_TOKENS)
    monkeypatch.setattr(run_inference, "DECODING", "greedy")
    monkeypatch.setattr(run_inference, "SHOW_ALTERNATIVES", 0)


def load(folder, max_seq_len=256):
    model, tokenizer = load_llama(folder, dtype=torch.float32, max_seq_len=max_seq_len)
    return model, tokenizer


def fed_lengths(model) -> list:
    """The number of tokens of every forward pass from now on (a hook on the embedding)."""
    lengths = []
    model.tok_embeddings.register_forward_pre_hook(lambda module, inputs: lengths.append(inputs[0].shape[1]))
    return lengths


def answer_of(conversation, tokenizer, text: str) -> list:
    """The generated tokens of the last exchange, whose user message was `text`: after the user message
    and the assistant header, before the closing <|eot_id|>."""
    chat_format = run_inference.ChatFormat(tokenizer)
    user = chat_format.encode_message({"role": "user", "content": text}) + chat_format.encode_header("assistant")
    exchange = conversation.exchanges[-1]
    assert exchange[: len(user)] == user and exchange[-1] == tokenizer.eot_id
    return exchange[len(user) : -1]


def test_second_answer_equals_the_whole_dialog_prefilled_from_scratch(tiny_checkpoint, chat_settings):
    folder = tiny_checkpoint("gqa4")
    model, tokenizer = load(folder)
    conversation = run_inference.Conversation([tokenizer.bos_id])
    run_inference.chat_turn(model, tokenizer, conversation, "Hello, how are you?", is_main=False, turn=0)
    first_answer = answer_of(conversation, tokenizer, "Hello, how are you?")
    cached_after_first = conversation.cached
    dialog_before_second = conversation.tokens()
    assert cached_after_first == len(dialog_before_second) - 2  # all but the last answer token and <|eot_id|>

    lengths = fed_lengths(model)
    run_inference.chat_turn(model, tokenizer, conversation, "Tell me more.", is_main=False, turn=1)
    second_answer = answer_of(conversation, tokenizer, "Tell me more.")
    prompt = conversation.tokens()[: len(conversation.tokens()) - len(second_answer) - 1]
    assert lengths[0] == len(prompt) - cached_after_first  # the prefill ran only what the cache lacked
    assert prompt[: len(dialog_before_second)] == dialog_before_second  # the dialog grew only at its end

    fresh, _ = load(folder)
    expected = [token for token, _ in run_inference.greedy_decode(fresh, prompt, NEW_TOKENS, tokenizer.stop_tokens)]
    assert second_answer == expected and len(expected) > 0
    assert first_answer  # the tiny model's answers are random bytes, but they exist


def test_reset_answers_as_a_fresh_start(tiny_checkpoint, chat_settings):
    model, tokenizer = load(tiny_checkpoint("gqa4"))
    conversation = run_inference.Conversation([tokenizer.bos_id])
    run_inference.chat_turn(model, tokenizer, conversation, "First question", is_main=False, turn=0)
    fresh_answer = answer_of(conversation, tokenizer, "First question")
    run_inference.chat_turn(model, tokenizer, conversation, "Something else", is_main=False, turn=1)
    conversation.reset()
    assert conversation.exchanges == [] and conversation.cached == 1  # <|begin_of_text|> stays cached
    run_inference.chat_turn(model, tokenizer, conversation, "First question", is_main=False, turn=2)
    assert answer_of(conversation, tokenizer, "First question") == fresh_answer


def test_a_dialog_too_long_for_its_context_drops_the_oldest_exchanges(tiny_checkpoint, chat_settings, capsys):
    model, tokenizer = load(tiny_checkpoint("gqa4"), max_seq_len=100)
    system = run_inference.ChatFormat(tokenizer).encode_message({"role": "system", "content": "Be brief."})
    conversation = run_inference.Conversation([tokenizer.bos_id] + system)
    for turn in range(6):  # each exchange is about 30 of the 100 positions
        run_inference.chat_turn(model, tokenizer, conversation, f"question {turn}", is_main=True, turn=turn)
        assert len(conversation.tokens()) <= 100
    output = capsys.readouterr().out
    assert "dropped the 1 oldest exchange and prefilled the rest again" in output
    assert output.count("[prefilled") == 6  # every turn was answered
    assert conversation.start[1:] == system  # the system message stays
    last_user_text = tokenizer.decode(conversation.exchanges[-1])
    assert "question 5" in last_user_text and "question 0" not in tokenizer.decode(conversation.tokens())


def test_a_message_larger_than_the_context_is_refused_and_the_chat_goes_on(tiny_checkpoint, chat_settings,
                                                                          capsys):
    model, tokenizer = load(tiny_checkpoint("gqa4"), max_seq_len=100)
    conversation = run_inference.Conversation([tokenizer.bos_id])
    run_inference.chat_turn(model, tokenizer, conversation, "x" * 200, is_main=True, turn=0)
    assert conversation.exchanges == []
    assert "does not fit the chat's 100 tokens (CHAT_CONTEXT); send a shorter one" in capsys.readouterr().out
    run_inference.chat_turn(model, tokenizer, conversation, "short", is_main=True, turn=1)
    assert len(conversation.exchanges) == 1


def run_chat(folder, messages: str, settings: str = "") -> subprocess.CompletedProcess:
    code = f"import run_inference as r\nr.CHAT = True\nr.MAX_NEW_TOKENS = {NEW_TOKENS}\n{settings}\nr.main()"
    environment = os.environ | {"LLAMA_CHECKPOINT_DIR": str(folder), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], input=messages, capture_output=True, text=True,
                          timeout=120, env=environment, cwd=REPO_ROOT)


def test_script_chats_over_piped_standard_input(tiny_checkpoint):
    """Two messages (one over two lines), /reset, the first again, then the end of input."""
    finished = run_chat(tiny_checkpoint("gqa4"), "Hello there\nsecond \\\nline\n/reset\nHello there\n",
                        "r.IS_INSTRUCT = True\nr.DTYPE = 'float32'\nr.SHOW_TOKENS = True")
    assert finished.returncode == 0, finished.stderr
    status = [line for line in finished.stdout.splitlines() if line.startswith("[prefilled")]
    assert len(status) == 3
    # The byte-level tokenizer: <|begin_of_text|>, the user header (1 + 4 + 1 + 2 tokens), 11 bytes of
    # text, <|eot_id|>, the assistant header (1 + 9 + 1 + 2): 34 tokens.
    assert status[0].startswith("[prefilled 34, reused 0, answer ")
    assert ", reused 0," not in status[1]  # the second turn reused the first one's cache
    assert status[2].startswith("[prefilled 33, reused 1, ")  # after /reset only <|begin_of_text|> is cached
    assert "(a new conversation)" in finished.stdout
    answers = [re.findall(r"^\s+\d+\s+(\d+)\s+[\d.]+%", turn, re.MULTILINE)  # SHOW_TOKENS: step, id, prob
               for turn in finished.stdout.split("[prefilled")[:3]]
    assert answers[0] and answers[0] == answers[2]  # after /reset: the first answer again


def test_script_chats_by_sampling_and_shows_alternatives(tiny_checkpoint):
    finished = run_chat(tiny_checkpoint("gqa4"), "Hello\nAgain\n/exit\nnever read\n",
                        "r.IS_INSTRUCT = True\nr.DECODING = 'sample'\nr.SHOW_ALTERNATIVES = 3")
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.count("[prefilled") == 2  # /exit ended it before the third message
    assert finished.stdout.count("entropy (bits)  alternatives") == 2  # one table per answer


def test_a_message_that_is_not_utf8_is_answered_with_its_bytes_replaced(tiny_checkpoint):
    """Where standard input decodes strictly, a byte such as Latin-1's é would end the chat in a traceback."""
    code = f"import run_inference as r\nr.CHAT = True\nr.IS_INSTRUCT = True\nr.MAX_NEW_TOKENS = {NEW_TOKENS}\nr.main()"
    environment = os.environ | {"LLAMA_CHECKPOINT_DIR": str(tiny_checkpoint("gqa4")), "OMP_NUM_THREADS": "1",
                                "PYTHONIOENCODING": "utf-8:strict"}
    finished = subprocess.run([sys.executable, "-c", code], input=b"hello\ncaf\xe9\n", capture_output=True,
                              timeout=120, env=environment, cwd=REPO_ROOT)
    assert finished.returncode == 0 and finished.stderr == b"", finished.stderr.decode()[-2000:]
    assert finished.stdout.count(b"[prefilled") == 2  # both messages answered


def test_an_unknown_command_is_named_not_sent_to_the_model(tiny_checkpoint):
    finished = run_chat(tiny_checkpoint("gqa4"), "/quit\n/etc/passwd\n/quit please\n", "r.IS_INSTRUCT = True")
    assert finished.returncode == 0, finished.stderr
    assert "(unknown command /quit: the commands are /reset and /exit; to send it to the model, add a word)" in finished.stdout
    assert finished.stdout.count("[prefilled") == 2  # a path and a message of two words are answered


@pytest.mark.parametrize("settings, culprit", [
    ("r.IS_INSTRUCT = False", "IS_INSTRUCT = False says this is not one"),
    ("r.IS_INSTRUCT = None", "has no 'Instruct' in its name"),
    ("r.IS_INSTRUCT = True\nr.DECODING = 'beam'", "DECODING = 'beam' does not chat"),
    ("r.IS_INSTRUCT = True\nr.CHAT_CONTEXT = 4", "CHAT_CONTEXT = 4 leaves no room"),
])
def test_chat_settings_that_cannot_work_end_in_one_line(tiny_checkpoint, settings, culprit):
    finished = run_chat(tiny_checkpoint("gqa4"), "", settings)
    assert finished.returncode == 1
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], finished.stderr
