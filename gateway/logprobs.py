"""Logprobs in OpenAI's two shapes, from the engine's (engine.sequence.Logprob per output token:
its logprob, and the most likely tokens' (id, logprob) at its position).

    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
                  "refusal": None}
    completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}],
                  "text_offset": [...]}

A token's text is its own bytes decoded as UTF-8 (a token that is part of a character shows
U+FFFD; `bytes` has the exact bytes, for the client to join).
"""
from __future__ import annotations

import functools

from tokenizers import decoders

from engine.sequence import Logprob


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


class TokenText:
    """Each token id's bytes and text, as logprobs show them; computed once per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def of(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            self._cache[token_id] = self._compute(token_id)
        return self._cache[token_id]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:                   # a model served by token ids: vLLM's spelling
            text = f"token_id:{token_id}"
            return text, list(text.encode())
        raw = None
        if self._byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            alphabet = _byte_level_alphabet()
            if piece is not None and all(ch in alphabet for ch in piece):
                raw = bytes(alphabet[ch] for ch in piece)
        if raw is None:                              # not byte-level, or an added token
            raw = self.tokenizer.decode([token_id]).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


def chat(entries: list[Logprob], token_ids: list[int], text: TokenText) -> dict:
    """Chat's `logprobs` of the tokens `token_ids` (one entry each)."""
    def item(token_id: int, logprob: float) -> dict:
        token, raw = text.of(token_id)
        return {"token": token, "logprob": logprob, "bytes": raw}
    return {"content": [item(t, lp) | {"top_logprobs": [item(i, v) for i, v in top]}
                        for t, (lp, top) in zip(token_ids, entries)],
            "refusal": None}


def completion(entries: list[Logprob], token_ids: list[int], text: TokenText, offset: int) -> tuple[dict, int]:
    """Completions' `logprobs` of `token_ids`, the first at character `offset` of the choice's
    text; and the offset after the last."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, (lp, top) in zip(token_ids, entries):
        token = text.of(t)[0]
        out["tokens"].append(token)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({text.of(i)[0]: v for i, v in top})
        out["text_offset"].append(offset)
        offset += len(token)
    return out, offset
