"""Tokenizers: ``tokenizer.json`` (via ``tokenizers``) or ``tokenizer.model`` (sentencepiece),
special tokens from ``tokenizer_config.json`` / ``generation_config.json``, and an incremental
detokenizer that never emits half a character."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """One interface over both tokenizer kinds."""

    def __init__(self, backend: Any, kind: str, config: dict[str, Any], eos_ids: Iterable[int]):
        self._backend = backend
        self._kind = kind  # "hf" or "sentencepiece"
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template: str | None = config.get("chat_template")
        if kind == "hf":
            added = backend.get_added_tokens_decoder()
            self._special = {tok.content: i for i, tok in added.items() if tok.special}
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        else:
            self._special = {
                _token_text(v): int(k)
                for k, v in (config.get("added_tokens_decoder") or {}).items()
            }
            for i in (backend.bos_id(), backend.eos_id(), backend.unk_id()):
                if i >= 0:
                    self._special.setdefault(backend.id_to_piece(i), i)
            self.vocab_size = backend.get_piece_size()
        self.special_ids = frozenset(self._special.values())
        ids = set(eos_ids)
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            ids.add(self.token_to_id(self.eos_token))
        self.eos_ids = frozenset(ids)
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self._split = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self._special, key=len, reverse=True)) + ")")
            if self._special else None
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        config = read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        if template_file.exists():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        gen = read_json(path / "generation_config.json")
        eos = gen.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer

            return cls(HFTokenizer.from_file(str(path / "tokenizer.json")), "hf", config, eos_ids)
        if (path / "tokenizer.model").exists():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            return cls(sp, "sentencepiece", config, eos_ids)
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        if self._kind == "hf":
            return self._backend.token_to_id(token)
        i = self._backend.piece_to_id(token)
        return None if i == self._backend.unk_id() and token != self._backend.id_to_piece(i) else i

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids. Special tokens written in the text (from a chat template) are kept whole."""
        if self._kind == "hf":
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids: list[int] = []
        add_bos = self.config.get("add_bos_token", True)
        if add_special_tokens and add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        pieces = self._split.split(text) if self._split else [text]
        for piece in pieces:
            if piece in self._special:
                ids.append(self._special[piece])
            elif piece:
                ids.extend(self._backend.encode(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._kind == "hf":
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self._backend.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._backend.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._backend.decode(run))
        return "".join(out)


class IncrementalDetokenizer:
    """Turns a growing id sequence into text deltas.

    Decodes a short window (a few tokens of left context plus the new ones) and emits only what
    the window adds past the already-read text; a window ending in U+FFFD is an incomplete UTF-8
    sequence (byte-level BPE) and is held back until the next token completes it. The left context
    matters for sentencepiece, whose leading-space handling depends on the previous piece.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context: Sequence[int] = ()):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(context)[-6:]
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        delta = text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 64:  # keep the window short: drop ids no window will read again
            self._ids = self._ids[self._prefix - 6:]
            self._read -= self._prefix - 6
            self._prefix = 6
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text):] if len(text) > len(prefix_text) else ""
