"""Incremental detokenization with stop strings.

Decodes only a short window of tokens per step (vLLM's prefix/read offsets), so streaming costs
O(1) per token; holds back text that could still become the start of a stop string, and a
trailing incomplete UTF-8 sequence (decoded as U+FFFD) until the next token completes it."""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""            # decoded so far (cut at a stop string once one appears)
        self._emitted = 0         # characters of `text` already returned
        self._prefix = 0          # token offsets of the decode window
        self._read = 0
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._last: tuple[list[int], int] | None = None   # what step() saw last

    def step(self, token_ids: list[int], start: int) -> tuple[str, bool]:
        """Text to emit after the newest token of `token_ids[start:]` (the output), and whether
        a stop string was reached. Decodes only the window since the last emitted text."""
        if self.tokenizer is None:
            return "", False
        self._last = (token_ids, start)
        decode = lambda a, b: self.tokenizer.decode(token_ids[start + a:start + b],  # noqa: E731
                                                    skip_special_tokens=True)
        n = len(token_ids) - start
        before = decode(self._prefix, self._read)
        after = decode(self._prefix, n)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, n
        stopped = False
        if self.stop:
            start = max(0, self._emitted - self._holdback)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                stopped = True
        end = len(self.text) if stopped else max(self._emitted, len(self.text) - self._holdback)
        return self._take(end), stopped

    def flush(self) -> str:
        """The held-back rest, when the sequence ends for another reason (a trailing incomplete
        UTF-8 sequence comes out as U+FFFD)."""
        if self._last is not None:
            token_ids, start = self._last
            tail = self.tokenizer.decode(token_ids[start + self._prefix:], skip_special_tokens=True)
            head = self.tokenizer.decode(token_ids[start + self._prefix:start + self._read],
                                         skip_special_tokens=True)
            self.text += tail[len(head):]
            self._prefix = self._read = len(token_ids) - start
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out, self._emitted = self.text[self._emitted:end], max(self._emitted, end)
        return out
