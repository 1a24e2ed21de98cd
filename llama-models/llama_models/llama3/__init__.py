"""Llama 3.x text models: ModelArgs (args.py), Transformer (model.py), Tokenizer (tokenizer.py),
ChatFormat (chat_format.py) and load_llama (checkpoint.py)."""

from .args import LlamaError, ModelArgs
from .chat_format import ChatFormat
from .checkpoint import load_llama
from .model import Transformer
from .tokenizer import StreamingDecoder, Tokenizer

__all__ = ["ChatFormat", "LlamaError", "ModelArgs", "StreamingDecoder", "Tokenizer", "Transformer", "load_llama"]
