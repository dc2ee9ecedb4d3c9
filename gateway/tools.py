"""Tool calls: the model's text back to OpenAI's `tool_calls`, in the two formats open models
write (vLLM's `hermes` and `llama3_json` parsers follow the same rules):

    hermes        <tool_call>{"name": "f", "arguments": {...}}</tool_call>  (Hermes, Qwen 2.5/3):
                  any number, after optional text (the message's content)
    llama3_json   {"name": "f", "parameters": {...}}  (Llama 3.1+; after <|python_tag|>): the
                  whole reply, one call or several separated by ";"

Text that does not parse as calls stays the reply's content. The tools reach the model through
the chat template (`tools=`); which format a model writes is `model.tool_call_parser`, or,
with "auto", the one its chat template names.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

PARSERS = ("hermes", "llama3_json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HERMES_START = "<tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def parser_for(setting: str, chat_template: str | None) -> str | None:
    """The parser `model.tool_call_parser` names; with "auto", the one the chat template's text
    points at (None: this model takes no tools)."""
    if setting in PARSERS:
        return setting
    if setting != "auto" or not chat_template:
        return None
    chat_template = str(chat_template)         # a tokenizer may hold several, by name
    if _HERMES_START in chat_template:
        return "hermes"
    if _PYTHON_TAG in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str            # a JSON object, as OpenAI sends it

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply; no calls: the text is all content."""
    calls: list[ToolCall] = []
    if parser == "hermes":
        start = text.find(_HERMES_START)
        if start < 0:
            return text, []
        for body in _HERMES.findall(text, start):
            call = _call(body, "arguments")
            if call is None:
                return text, []
            calls.append(call)
        content = text[:start].strip()
        return (content or None, calls) if calls else (text, [])
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    for part in _split_objects(body):
        call = _call(part, "parameters", "arguments")
        if call is None:
            return text, []
        calls.append(call)
    return (None, calls) if calls else (text, [])


def _call(body: str, *argument_keys: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in argument_keys if k in obj), {})
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _split_objects(body: str) -> list[str]:
    """`{...}; {...}` into its objects (';' inside strings left alone by the JSON decoder)."""
    decoder, parts, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            _, end = decoder.raw_decode(body, pos)
        except ValueError:
            return [body]                      # not calls: `parse` leaves it as content
        parts.append(body[pos:end])
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return parts


class StreamedReply:
    """A streamed reply of a request with tools: text is passed on as it comes until it may be
    the start of a call; from there it is held, and parsed at the end."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.text = ""              # the whole reply so far
        self._sent = 0              # characters of it streamed as content

    def feed(self, piece: str) -> str:
        """Add `piece`; return the content that can be streamed now."""
        self.text += piece
        if self.parser == "llama3_json":     # a call is the whole reply: hold it while it may be one
            head = self.text.lstrip()
            if head and not (head.startswith("{") or _PYTHON_TAG.startswith(head[:len(_PYTHON_TAG)])):
                return self._release(len(self.text))
            return ""
        start = self.text.find(_HERMES_START, self._sent)
        if start >= 0:
            return self._release(start)
        # hold a tail that may be the start of "<tool_call>"
        keep = next((k for k in range(min(len(_HERMES_START) - 1, len(self.text)), 0, -1)
                     if _HERMES_START.startswith(self.text[-k:])), 0)
        return self._release(len(self.text) - keep)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: the content not yet streamed, and the calls."""
        _, calls = parse(self.parser, self.text)
        if not calls:
            return self._release(len(self.text)), []
        return "", calls            # the calls' text was held; the content before them is streamed

    def _release(self, end: int) -> str:
        out = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return out
