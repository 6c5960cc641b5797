"""Turn text into token ids and back: a built-in byte tokenizer or a local HF `tokenizer.json`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy

from common.errors import UserError

# Names that tokenizer families use for their end-of-document token, in order of preference.
EOD_TOKEN_NAMES = ("<|endoftext|>", "</s>", "<eos>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus one end-of-document id (256): needs no file, works offline."""

    vocab_size = 257

    @property
    def eod(self) -> int:
        return 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts: list[str]) -> list[numpy.ndarray]:
        return [numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8) for text in texts]

    def fingerprint(self) -> str:
        return "byte"

    def detokenize(self, ids: Iterable[int]) -> str:
        # EOD has no byte; dropping it keeps decode total instead of raising on a valid id.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A HuggingFace `tokenizers` tokenizer from a local JSON file (or, by name, the hub), behind the same interface."""

    def __init__(self, json_path: str, hub_name: str | None = None):
        import tokenizers  # only paid for when a real tokenizer is asked for

        try:
            if hub_name is not None:
                self._tokenizer = tokenizers.Tokenizer.from_pretrained(hub_name)
            else:
                self._tokenizer = tokenizers.Tokenizer.from_file(json_path)
        except Exception as error:  # the library raises bare Exceptions for unreadable files
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            if hub_name is not None:
                raise UserError(
                    f"tokenizer '{hub_name}' is no local path and could not be loaded from the "
                    f"Hugging Face hub: {first_line}"
                ) from None
            raise UserError(f"tokenizer '{json_path}' could not be read: {first_line}") from None
        json_path = hub_name or json_path
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._eod = _find_eod(self._tokenizer, json_path)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        # No BOS/EOS from the post-processor: preprocess appends exactly one EOD per document.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        # the same ids as encode_batch, without the character offsets nobody here reads
        return [e.ids for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def fingerprint(self) -> str:
        """A hash of the tokenizer's whole definition: a resumed run must tokenize as the first did."""
        import hashlib

        return hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest()

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def _find_eod(tokenizer: Any, json_path: str) -> int:
    """The id of the first known end-of-document token the vocabulary holds."""
    for name in EOD_TOKEN_NAMES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    names = ", ".join(EOD_TOKEN_NAMES)
    raise UserError(f"tokenizer '{json_path}' has no end-of-document token: expected one of {names}")


def looks_like_a_path(name: str) -> bool:
    """Hub names are 'model' or 'org/model'; anything path-like must exist locally (no download)."""
    return name.startswith(("/", ".", "~")) or name.endswith(".json") or os.sep + os.sep in name or name.count("/") > 1


def build_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """'byte' → ByteTokenizer; a local tokenizer.json (or a folder holding one) → HFTokenizer;
    any other 'org/model' name → that tokenizer from the Hugging Face hub (downloaded once)."""
    if name == "byte":
        return ByteTokenizer()
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if os.path.isfile(path):
        return HFTokenizer(path)
    if looks_like_a_path(name):
        raise UserError(f"tokenizer '{name}' not found: give 'byte', a local tokenizer.json path or a hub name")
    return HFTokenizer(path, hub_name=name)
