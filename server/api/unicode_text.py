"""Request text must be Unicode scalar values: no lone UTF-16 surrogate anywhere in a body.

JSON may spell a surrogate half alone (`"\\udcff"`) and Python's json decodes it into a `str` that
cannot be encoded as UTF-8: the tokenizer, the chat template, stop strings and every answer that
echoes the text would fail on it. The request models refuse it up front (`StrictModel` runs
`refuse_lone_surrogates` before any field), naming where it sits, such as `messages[0].content`.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticCustomError

ERROR_TYPE = "invalid_unicode"

_Path = tuple[str | int, ...]
_NESTED = (str, dict, list)  # what may hold text; numbers, booleans and null cannot
_NESTED_TYPES = frozenset(_NESTED)  # the exact types json decodes into


def param_name(path: _Path) -> str | None:
    """`("messages", 0, "content")` -> `messages[0].content`; the body itself is None."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _surrogate_at(text: str) -> int | None:
    """Index of the first lone surrogate in `text`, or None (UTF-8 can encode anything else)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def find_lone_surrogate(data: Any) -> tuple[_Path, bool, str, int] | None:
    """The first lone surrogate in decoded JSON, in document order: (where, in a key?, the text, index).

    A key's place is the object that holds it. The walk keeps its own stack: no depth is too deep."""
    stack: list[tuple[_Path, Any, bool]] = [((), data, False)]
    while stack:
        path, value, is_key = stack.pop()
        if isinstance(value, str):
            index = _surrogate_at(value)
            if index is not None:
                return path, is_key, value, index
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if isinstance(item, _NESTED):
                    stack.append(((*path, key), item, False))
                stack.append((path, key, True))  # popped before its value
        elif isinstance(value, list) and not _NESTED_TYPES.isdisjoint(map(type, value)):  # C speed for token ids
            for i in range(len(value) - 1, -1, -1):
                if isinstance(value[i], _NESTED):
                    stack.append(((*path, i), value[i], False))
    return None


def refuse_lone_surrogates(data: Any) -> Any:
    """`data` unchanged, or a pydantic error of type `invalid_unicode` whose ctx names the parameter."""
    found = find_lone_surrogate(data)
    if found is None:
        return data
    path, in_key, text, index = found
    param = param_name(path)
    where = f"a key of {param}" if in_key and param else ("a key of the body" if in_key else param or "the body")
    raise PydanticCustomError(
        ERROR_TYPE,
        "Invalid value for {where}: the text is not valid Unicode, it holds a lone UTF-16 surrogate ({char}) "
        "at character {index}. Send UTF-8 text; a character beyond U+FFFF is escaped in JSON as a whole "
        "surrogate pair (such as \\ud83d\\ude00), never half of one",
        {"where": where, "param": param, "char": f"U+{ord(text[index]):04X}", "index": index},
    )
