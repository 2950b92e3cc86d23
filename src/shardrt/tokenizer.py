"""Text <-> token ids and the chat template, both from the GGUF file's own metadata.

transformers builds the tokenizer from the GGUF vocabulary; the converted tokenizer is kept
in the cache, keyed by the file's name, size and mtime, so later runs start in a fraction
of the time.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .errors import ModelFormatError
from .gguf_file import GGUFFile
from .paths import cache_dir

log = logging.getLogger(__name__)

# GGUF keys of tokens that end a turn besides EOS (llama 3's <|eot_id|>, <|eom_id|>)
EXTRA_STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def _cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _from_gguf(path: Path):
    """transformers' tokenizer from the GGUF's vocabulary. AutoTokenizer reads the model's config
    from the file as well, which fails for some architectures (transformers 5 cannot parse
    gpt-oss's rope scaling keys); then the fast tokenizer class, which reads only the vocabulary."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises assorted types for tokenizers it cannot convert
        first = exc
    try:
        return PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    except Exception:
        raise ModelFormatError(f"model: cannot build a tokenizer from {path.name!r}: {first}") from None


class Tokenizer:
    def __init__(self, model_path: str | Path):
        from transformers import AutoTokenizer  # heavy import, only where text is needed

        path = Path(model_path)
        with GGUFFile(path) as gguf:
            if "tokenizer.ggml.tokens" not in gguf.metadata:
                raise ModelFormatError(f"model: {path.name!r} has no tokenizer (tokenizer.ggml.tokens)")
            self.stop_ids = frozenset(int(gguf.get(k)) for k in EXTRA_STOP_KEYS if k in gguf.metadata)
            self.chat_template = gguf.get("tokenizer.chat_template")
        saved = cache_dir() / "tokenizers" / _cache_key(path)
        if (saved / "tokenizer.json").exists():
            self.hf = AutoTokenizer.from_pretrained(saved)
        else:
            self.hf = _from_gguf(path)
            try:
                self.hf.save_pretrained(saved)
            except OSError as exc:
                log.warning("could not cache the tokenizer in %s: %s", saved, exc)
        if self.hf.eos_token_id is not None:
            self.stop_ids |= {int(self.hf.eos_token_id)}

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text))

    def encode_many(self, texts: list[str], special: bool) -> list[list[int]]:
        """Several texts at once, as `encode` (`special`: with the tokenizer's special tokens, BOS)
        or `encode_rendered` would give each: one call into the Rust tokenizer, which leaves the
        GIL and spreads the texts over the cores."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            return [list(self.hf.encode(t, add_special_tokens=special)) for t in texts]
        return [list(e.ids) for e in backend.encode_batch(texts, add_special_tokens=special)]

    def decode(self, ids: list[int]) -> str:
        # clean-up of spaces is meant for WordPiece and corrupts byte-level BPE text
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode_rendered(self.render_chat(messages))

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as the chat template writes it, ready for the assistant's turn."""
        if not self.chat_template:
            raise ModelFormatError("model: has no chat template (tokenizer.chat_template); drop --chat")
        return self.hf.apply_chat_template(messages, chat_template=self.chat_template,
                                           add_generation_prompt=True, tokenize=False)

    def encode_rendered(self, text: str) -> list[int]:
        """Text the chat template wrote: its special tokens are in it already."""
        return list(self.hf.encode(text, add_special_tokens=False))


class TextStream:
    """The text of a growing token list, decoding only its tail at each step (a full decode per
    token costs more than a GPU decode step by the end of a long answer). A token's text can
    depend on the tokens before it (a word-start marker, a character split over byte tokens), so
    the tail is decoded with the previous step's tokens as context and only the difference kept;
    a tail that ends inside a character waits for the next token."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.text = tokenizer, ""
        self.context, self.done = 0, 0  # tokens[context:done] are decoded already, and are the context

    def update(self, tokens: list[int]) -> str:
        before = self.tokenizer.decode(tokens[self.context : self.done])
        after = self.tokenizer.decode(tokens[self.context :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.context, self.done = self.done, len(tokens)
        return self.text
