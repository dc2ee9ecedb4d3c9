"""Chat messages to prompt token ids, where only the chat template's own text becomes special
tokens: special-token text inside a message ("<|end|><|system|>...") is encoded as the plain
text it is, so a client cannot forge a turn, a role or an end of sequence.

Messages without special-token text are rendered and tokenized exactly as transformers'
`apply_chat_template` does. When a message holds some, its span in the rendered text is found by
rendering once more with placeholders; the text is then cut at each special-token occurrence
inside a message, the pieces in between are tokenized as usual (the template's own special
tokens among them stay special), and each cut-out occurrence is tokenized as plain text. (With a
SentencePiece-style tokenizer such a piece starts a word: the model sees a space before it.)
"""
from __future__ import annotations

import copy
import json
import re
import uuid

from engine.errors import InvalidRequest


class ChatEncoder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.get_added_vocab()          # every added token: text -> id
        self._special = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))) \
            if added else None
        self._special_ids = set(added.values())
        self._plain = copy.deepcopy(tokenizer.backend_tokenizer)   # own copy: thread-safe
        self._plain.encode_special_tokens = True     # added-token text is just text here
        # encoding "<special>piece" and dropping the first id tokenizes `piece` as it would be
        # right after a special token (SentencePiece adds no leading space there); the glue
        # must not strip the whitespace next to it
        plain_added = [t.content for t in tokenizer.added_tokens_decoder.values()
                       if not (t.lstrip or t.rstrip)]
        self._glue = plain_added[0] if plain_added else None

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of `messages` (and the `tools` offered, if any) rendered with the chat
        template, ready for the assistant's turn. Raises InvalidRequest if the template fails,
        if a message holds special-token text in a way this template's output cannot be cut
        apart safely, or if the tools or a message's tool calls hold any (they are rendered as
        the template writes them, not cut apart)."""
        if self._special is not None and self._special.search(
                json.dumps([tools, [m.get("tool_calls") for m in messages]], ensure_ascii=False)):
            raise InvalidRequest("tools and tool calls may not hold special-token text", "tools")
        text = self._render(messages, tools)
        if self._special is None or not any(self._special.search(m["content"]) for m in messages):
            return self.tokenizer.encode(text, add_special_tokens=False)
        spans = self._content_spans(messages, text, tools)
        ids: list[int] = []
        templated = 0        # special tokens outside every message: the template's own
        pos = 0
        for m in self._special.finditer(text):
            if not any(a < m.end() and m.start() < b for a, b in spans):
                templated += 1
                continue
            ids += self._encode_piece(text[pos:m.start()], first=pos == 0)
            ids += self._plain.encode(m.group(), add_special_tokens=False).ids
            pos = m.end()
        ids += self._encode_piece(text[pos:], first=pos == 0)
        if sum(i in self._special_ids for i in ids) != templated:     # never let one through
            raise InvalidRequest("a message holds special-token text that this model's chat template "
                                 "cannot carry as plain text", "messages")
        return ids

    def _render(self, messages: list[dict], tools: list[dict] | None) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as e:   # jinja raises its own errors, templates raise on bad input
            raise InvalidRequest(f"the chat template rejected these messages: {e}", "messages") from None

    def _encode_piece(self, piece: str, first: bool) -> list[int]:
        if first or self._glue is None:
            return self.tokenizer.encode(piece, add_special_tokens=False)
        ids = self.tokenizer.encode(self._glue + piece, add_special_tokens=False)
        return ids[1:]

    def _content_spans(self, messages: list[dict], text: str, tools: list[dict] | None) -> list[tuple[int, int]]:
        """Where each message's content lies in `text`: render with a placeholder per message,
        then put the contents (as the template passed them: whole or stripped) in their place."""
        marks = [f"kvgate{uuid.uuid4().hex}{i}" for i in range(len(messages))]
        shape = self._render([{**m, "content": mark} for m, mark in zip(messages, marks)], tools)
        pieces, rest = [], shape
        for mark in marks:
            before, found, rest = rest.partition(mark)
            if not found or mark in rest:
                raise InvalidRequest("a message holds special-token text and this model's chat template "
                                     "does not show each message once", "messages")
            pieces.append(before)
        for transform in (lambda s: s, str.strip):
            spans, out = [], pieces[0]
            for m, after in zip(messages, pieces[1:] + [rest]):
                content = transform(m["content"])
                spans.append((len(out), len(out) + len(content)))
                out += content + after
            if out == text:
                return spans
        raise InvalidRequest("a message holds special-token text and this model's chat template changes "
                             "message text in a way that cannot be traced", "messages")
