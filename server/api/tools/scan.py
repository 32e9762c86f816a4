"""Reading tool-call JSON objects out of text that may still be growing (a stream).

A call is a JSON object with a name and an arguments object ({"name": ..., "arguments": {...}} in
hermes, "parameters" in llama3_json). `scan_call` reads as much of one as the text holds: the name
once its string is complete, the arguments as the exact text the model wrote (a prefix while they
are incomplete), and where the object ends once it is complete. Arguments are passed on as written,
never re-serialised, so that the fragments of a stream add up to the arguments of the whole reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


@dataclass
class PartialCall:
    name: str | None = None  # known once its string is complete
    arguments: str = ""  # the arguments' text so far, exactly as written
    arguments_done: bool = False
    end: int | None = None  # index just past the object's closing brace, once complete
    valid: bool = True  # False: the text cannot become a call object


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def scan_call(text: str, start: int, argument_keys: tuple[str, ...]) -> PartialCall:
    """Read the call object that begins at text[start] ('{'), as far as the text goes."""
    call = PartialCall()
    pos = skip_ws(text, start)
    if pos >= len(text):
        return call
    if text[pos] != "{":
        call.valid = False
        return call
    pos += 1
    while True:
        pos = skip_ws(text, pos)
        if pos >= len(text):
            return call
        if text[pos] == "}":
            call.end = pos + 1
            return call
        try:
            key, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            call.valid = text[pos] == '"' and _unterminated(text, pos)
            return call
        pos = skip_ws(text, pos)
        if pos >= len(text):
            return call
        if text[pos] != ":" or not isinstance(key, str):
            call.valid = False
            return call
        pos = skip_ws(text, pos + 1)
        if pos >= len(text):
            return call
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:  # incomplete (or invalid) value: nothing follows it yet
            if key in argument_keys and text[pos] == "{":
                call.arguments = text[pos:]
            return call
        if key == "name":
            if not isinstance(value, str):
                call.valid = False
                return call
            call.name = value
        elif key in argument_keys:
            if isinstance(value, str) and _is_object_text(value):  # arguments sent as a JSON string
                call.arguments, call.arguments_done = value, True
            elif isinstance(value, dict):
                call.arguments, call.arguments_done = text[pos:end], True
            else:
                call.valid = False
                return call
        pos = skip_ws(text, end)
        if pos >= len(text):
            return call
        if text[pos] == ",":
            pos += 1
        elif text[pos] != "}":
            call.valid = False
            return call


def _unterminated(text: str, pos: int) -> bool:
    """text[pos:] is the start of a JSON string that has not ended yet."""
    escaped = False
    for char in text[pos + 1 :]:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return False
    return True


def _is_object_text(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
