"""Structured output: grammars (JSON Schema, regex, Lark) compiled by llguidance into token
matchers, and the per-step token bitmasks the sampler applies on the device.

A request carries its constraint as an llguidance grammar (a JSON string, hashable, made by
the ``*_grammar`` builders from the request's fields). ``Grammars.check`` compiles it for the
route (an invalid schema is refused there with the compiler's message) and caches the
compiled matcher by the grammar's text, so a repeated schema costs a dictionary lookup and a
``deep_copy`` at admission. The engine thread keeps one matcher per constrained sequence,
advances it with each sampled token, and fills the next step's bitmask rows of all of them in
one parallel call (llguidance releases the GIL and writes straight into the numpy array).
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

# JSON the model writes under a schema is compact (no whitespace between tokens): a small
# model given the freedom of flexible whitespace can spend its whole budget on newlines.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The grammar does not compile; the message says where."""


def _llg():
    import llguidance

    return llguidance


def json_schema_grammar(schema: Any) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    try:
        return _llg().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's ``json_object`` mode)."""
    return json_schema_grammar({"type": "object"})


def regex_grammar(pattern: str) -> str:
    return _llg().LLMatcher.grammar_from_regex(pattern)


def lark_grammar(source: str) -> str:
    return _llg().LLMatcher.grammar_from_lark(source)


def _sentencepiece_vocab(sp: Any) -> list[bytes]:
    """Each sentencepiece piece as the bytes it decodes to (``▁`` is a space, ``<0xAB>`` one
    byte)."""
    out = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out.append(bytes([int(piece[3:-1], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i):
            out.append(b"")
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _SentencePieceWrapper:
    """What llguidance's TokenizerWrapper reads from a tokenizer, for a sentencepiece model."""

    def __init__(self, tok: Any):
        sp = tok._backend
        self.tokens = _sentencepiece_vocab(sp)
        self.eos_token_id = sorted(tok.eos_ids)[0] if tok.eos_ids else sp.eos_id()
        self.bos_token_id = tok.bos_id
        self.special_token_ids = sorted(tok.special_ids)
        self._sp = sp

    def __call__(self, s: str) -> list[int]:
        return self._sp.encode(s)


class Grammars:
    """Compiled grammars of one tokenizer, cached by their text; thread safe."""

    def __init__(self, tokenizer: Any, vocab: int, cache_size: int = 256):
        self.tokenizer = tokenizer
        # The matcher's vocabulary covers the model's (padded past the tokenizer's: those ids
        # are never allowed); rows are cut to the model's bitmask width.
        self.vocab = max(vocab, tokenizer.vocab_size)
        self.words = (vocab + 31) // 32
        self._lock = threading.Lock()
        self._lltok = None
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cache_size = cache_size
        self._executor = None
        self.compiles = 0  # grammars compiled (cache misses), for tests and benchmarks
        self._text_tokens = False  # llguidance cannot read the vocabulary (see token_bytes)

    def _tokenizer(self):
        with self._lock:
            if self._lltok is None:
                llg = _llg()
                tok = self.tokenizer
                eos = sorted(tok.eos_ids) or None
                if tok._kind == "hf":
                    source = tok._backend.to_str()
                else:
                    source = llg.TokenizerWrapper(_SentencePieceWrapper(tok))
                self._lltok = llg.LLTokenizer(source, n_vocab=self.vocab, eos_token=eos)
                self._executor = llg.LLExecutor(num_threads=2)
            return self._lltok

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (a piece of a UTF-8 character stays that piece; a special token
        is its text), as llguidance's tokenizer, built from the same vocabulary, holds them. A
        vocabulary llguidance cannot read (a word-level one: ValueError) has whole-text tokens,
        whose text is their bytes."""
        if not self._text_tokens:
            try:
                return self._tokenizer().decode_bytes([token_id])
            except ValueError:
                self._text_tokens = True  # known now: do not rebuild the tokenizer per token
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def check(self, grammar: str) -> None:
        """Compile ``grammar`` (or find it compiled); GrammarError says why it does not."""
        self._template(grammar)

    def _template(self, grammar: str):
        with self._lock:
            m = self._compiled.get(grammar)
            if m is not None:
                self._compiled.move_to_end(grammar)
                return m
        llg = _llg()
        try:
            tokenizer = self._tokenizer()
        except ValueError as e:  # a vocabulary llguidance cannot read (a word-level one)
            raise GrammarError(f"this model's tokenizer cannot carry a grammar ({e})") from None
        m = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        with self._lock:
            self.compiles += 1
            self._compiled[grammar] = m
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return m

    def matcher(self, grammar: str):
        """A fresh matcher of ``grammar`` at its start."""
        return self._template(grammar).deep_copy()

    def masks(self, matchers: list[tuple[Any, int]]) -> dict[int, np.ndarray]:
        """The next token's bitmask row (W,) int32 of each (matcher, slot)."""
        if not matchers:
            return {}
        from llguidance.numpy import fill_next_token_bitmask_par

        self._tokenizer()
        out = np.zeros((len(matchers), (self.vocab + 31) // 32), np.int32)
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, (m, _) in enumerate(matchers)], out)
        return {slot: out[i, :self.words] for i, (_, slot) in enumerate(matchers)}

