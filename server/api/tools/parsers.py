"""Tool-call parsers: the model's text -> OpenAI tool calls, fed delta by delta (streaming) or at once.

Every parser reads the whole text so far and reports what is new since the last feed: content that
is surely not part of a call, then per call its id and name first, then fragments of its arguments.
A whole reply is parsed by feeding it at once, so a stream and a non-streamed reply agree.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional
  content (Hermes, Qwen2.5, Qwen3 templates);
- `llama3_json`: a reply that is `{"name": ..., "parameters": {...}}` objects (optionally after
  `<|python_tag|>`, separated by `;`), else plain content;
- `required` (tool_choice "required"): the grammar-forced `[{"name": ..., "parameters": {...}}, ...]`;
- `named` (tool_choice naming a function): the grammar-forced arguments of that function.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from server.api.tools.scan import PartialCall, scan_call, skip_ws


@dataclass
class ToolCallDelta:
    """What one stream chunk says about one call: id and name once, then argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_dict(self) -> dict:
        if self.name is not None:
            return {"index": self.index, "id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class _Sent:
    id: str
    name: str
    arguments: str = ""


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _pending_prefix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (held back while streaming)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ToolParser:
    """Base: subclasses split the text so far into (content, partial calls)."""

    falls_back_to_text = True  # a reply whose calls do not parse whole is returned as content

    def __init__(self, max_calls: int | None = None):
        self._max_calls = max_calls
        self._text = ""
        self._content_sent = 0
        self._sent: list[_Sent] = []
        self._last: list[PartialCall] = []

    def _split(self, text: str, final: bool) -> tuple[str, list[PartialCall]]:
        raise NotImplementedError

    def feed(self, delta: str) -> ParsedDelta:
        self._text += delta
        return self._step(final=False)

    def finish(self) -> ParsedDelta:
        return self._step(final=True)

    @property
    def called(self) -> bool:
        return bool(self._sent)

    def _step(self, final: bool) -> ParsedDelta:
        content, calls = self._split(self._text, final)
        if final and not self._sent and not any(c.name for c in calls):
            content = self._text if self.falls_back_to_text else content
        out = ParsedDelta()
        if len(content) > self._content_sent:
            out.content = content[self._content_sent :]
            self._content_sent = len(content)
        if self._max_calls is not None:
            calls = calls[: self._max_calls]
        self._last = calls
        for index, call in enumerate(calls):
            if not call.valid or call.name is None:
                break
            if index == len(self._sent):
                self._sent.append(_Sent(new_call_id(), call.name))
                out.calls.append(ToolCallDelta(index, self._sent[index].id, call.name, ""))
            sent = self._sent[index]
            if len(call.arguments) > len(sent.arguments) and call.arguments.startswith(sent.arguments):
                out.calls.append(ToolCallDelta(index, arguments=call.arguments[len(sent.arguments) :]))
                sent.arguments = call.arguments
        return out

    def result(self) -> tuple[str | None, list[ToolCall]]:
        """After finish(): (content, calls) of the whole reply. When a call did not parse whole, the
        auto parsers give the whole text back as content and no calls (vLLM does the same)."""
        calls = [ToolCall(s.id, s.name, s.arguments) for s in self._sent]
        complete = all(c.valid and c.arguments_done for c in self._last[: len(calls)])
        if self.falls_back_to_text and (not calls or not complete):
            return self._text, []
        content = self._text[: self._content_sent]
        return (content if content.strip() else None), calls


class HermesParser(ToolParser):
    TAG, END = "<tool_call>", "</tool_call>"

    def _split(self, text: str, final: bool) -> tuple[str, list[PartialCall]]:
        first = text.find(self.TAG)
        if first < 0:
            return (text if final else text[: len(text) - _pending_prefix(text, self.TAG)]), []
        calls = []
        pos = first
        while pos >= 0:
            start = pos + len(self.TAG)
            close = text.find(self.END, start)
            calls.append(scan_call(text[: close if close >= 0 else len(text)], start, ("arguments",)))
            if close < 0:
                break
            pos = text.find(self.TAG, close + len(self.END))
        return text[:first], calls


class Llama3JsonParser(ToolParser):
    PYTHON_TAG = "<|python_tag|>"

    def _split(self, text: str, final: bool) -> tuple[str, list[PartialCall]]:
        pos = skip_ws(text, 0)
        rest = text[pos:]
        if rest.startswith(self.PYTHON_TAG):
            pos = skip_ws(text, pos + len(self.PYTHON_TAG))
        elif not rest or (not final and self.PYTHON_TAG.startswith(rest)):
            return (text if final else ""), []
        elif rest[0] != "{":
            return text, []
        return "", _call_sequence(text, pos, ";", ("parameters", "arguments"))


class RequiredParser(ToolParser):
    """tool_choice "required": the grammar makes the reply a JSON array of {"name", "parameters"}."""

    falls_back_to_text = False

    def _split(self, text: str, final: bool) -> tuple[str, list[PartialCall]]:
        pos = skip_ws(text, 0)
        if pos >= len(text) or text[pos] != "[":
            return "", []
        return "", _call_sequence(text, skip_ws(text, pos + 1), ",", ("parameters",))


class NamedParser(ToolParser):
    """tool_choice naming a function: the grammar makes the whole reply that function's arguments."""

    falls_back_to_text = False

    def __init__(self, name: str):
        super().__init__(max_calls=1)
        self._name = name

    def _split(self, text: str, final: bool) -> tuple[str, list[PartialCall]]:
        try:
            done = isinstance(json.loads(text), dict)
        except ValueError:
            done = False
        return "", [PartialCall(name=self._name, arguments=text.strip() if done else text.lstrip(), arguments_done=done)]


def _call_sequence(text: str, pos: int, separator: str, argument_keys: tuple[str, ...]) -> list[PartialCall]:
    """Call objects from text[pos], one after another with `separator` between them."""
    calls = []
    while True:
        call = scan_call(text, pos, argument_keys)
        calls.append(call)
        if call.end is None or not call.valid:
            return calls
        pos = skip_ws(text, call.end)
        if pos < len(text) and text[pos] == separator:
            pos = skip_ws(text, pos + 1)
        if pos >= len(text) or text[pos] != "{":
            return calls


AUTO_PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}
