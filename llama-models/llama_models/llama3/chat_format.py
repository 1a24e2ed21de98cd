r"""The Llama 3 chat format: how a conversation becomes the token ids an instruct model reads.

Every message is a header naming who speaks, a blank line, the text, and <|eot_id|> (end of
turn). A prompt is <|begin_of_text|>, the messages in order, and then an assistant header with
nothing after it: the model goes on from there, writes the assistant's reply and ends it with
<|eot_id|>. As text, the prompt for a system message and one user question is (split into
lines here, one per message; \n stands for a newline character):

    <|begin_of_text|>
    <|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n

The special tokens (<|...|>) are single token ids; the rest is ordinary text. Message text is
used exactly as given, leading and trailing whitespace included.
"""

from collections.abc import Mapping, Sequence

from .tokenizer import Tokenizer

# system: instructions for the model; user: the person; assistant: the model's replies;
# ipython: the output of a tool the model called.
ROLES = ("system", "user", "assistant", "ipython")

Message = Mapping[str, str]  # {"role": "user", "content": "Who are you?"}


class ChatFormat:
    """Encodes chat messages into Llama 3 token ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, role: str) -> list[int]:
        r"""<|start_header_id|>role<|end_header_id|> and then "\n\n", the blank line that
        separates a header from the message text."""
        _check_role(role)
        special = self.tokenizer.special_tokens
        return [
            special["<|start_header_id|>"],
            *self._encode_text(role),
            special["<|end_header_id|>"],
            *self._encode_text("\n\n"),
        ]

    def encode_message(self, message: Message) -> list[int]:
        """One whole message: header, content, <|eot_id|>.

        The content is encoded as plain text, so a special token typed into it (e.g. the
        text "<|eot_id|>") cannot end the message or start a fake one.
        """
        role, content = _role_and_content(message)
        return [
            *self.encode_header(role),
            *self._encode_text(content),
            self.tokenizer.eot_id,
        ]

    def encode_dialog_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The prompt for the assistant's next reply: <|begin_of_text|>, every message, then
        an empty assistant message (just its header) for the model to fill in."""
        if not isinstance(messages, (list, tuple)):  # a str or a dict is iterable too, as something else
            raise TypeError(f"messages must be a list of dicts such as {{'role': 'user', 'content': 'Hi'}}, "
                             f"not a {type(messages).__name__}")
        tokens = [self.tokenizer.bos_id]
        for message in messages:
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header("assistant"))
        return tokens

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; the roles are {', '.join(ROLES)}")


def _role_and_content(message: Message) -> tuple[str, str]:
    """Take role and content out of a message dict, with a clear error if they are missing."""
    if not isinstance(message, Mapping):
        raise TypeError(
            f"a chat message must be a dict with 'role' and 'content', got {message!r}"
        )
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"chat message has no {key!r}: {message!r}")
    content = message["content"]
    if not isinstance(content, str):
        raise TypeError(
            f"chat message content must be a str, got {type(content).__name__}: {message!r}"
        )
    return message["role"], content
