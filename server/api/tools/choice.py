"""tool_choice, tools and parallel_tool_calls of a chat request -> what constrains the output and
which parser reads tool calls out of it.

- "none" (or no tools): the reply is text;
- "auto" (the default with tools): the server's --tool-call-parser reads calls out of the text
  (without one the reply stays text);
- "required": the output is forced to a JSON array of calls of the given tools, each call's
  arguments following its function's parameters schema (at most one call with
  parallel_tool_calls false), so it works whatever the model's weights;
- a named function: the output is forced to that function's arguments.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from server.api.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from server.api.structured_outputs import check_schema
from server.api.tools.parsers import AUTO_PARSERS, NamedParser, RequiredParser, ToolParser
from server.errors import InvalidRequest
from server.structured.spec import GrammarSpec

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    grammar: GrammarSpec | None  # what required / named force the output to
    new_parser: Callable[[], ToolParser] | None  # None: the reply is text
    forced: bool  # required or named: calls are the whole reply
    named: bool  # a named function: finish_reason stays "stop", as OpenAI's


NO_TOOLS = ToolPlan(grammar=None, new_parser=None, forced=False, named=False)


def _parameters(tools: list[Tool]) -> list[dict]:
    out = []
    for i, tool in enumerate(tools):
        params = tool.function.parameters
        if params is None:
            out.append(_EMPTY_PARAMETERS)
            continue
        param = f"tools[{i}].function.parameters"
        check_schema(params, param, "a function's parameters")
        if params.get("type", "object") != "object":
            raise InvalidRequest(f"{param}: a function's parameters must describe an object (type 'object').", param=param)
        out.append(params)
    return out


def _named(choice: NamedToolChoice, tools: list[Tool]) -> int:
    name = (choice.function or {}).get("name") if choice.type == "function" else None
    if not isinstance(name, str) or not name:
        raise InvalidRequest(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}.",
            param="tool_choice",
        )
    for i, tool in enumerate(tools):
        if tool.function.name == name:
            return i
    known = ", ".join(repr(t.function.name) for t in tools)
    raise InvalidRequest(f"tool_choice names the function {name!r}, which is not in tools ({known}).", param="tool_choice")


def plan_tools(body: ChatCompletionRequest, auto_parser: str | None) -> ToolPlan:
    choice = body.tool_choice
    tools = body.tools or []
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequest("tool_choice needs tools: send the functions the model may call.", param="tool_choice")
    if not tools or choice == "none":
        return NO_TOOLS
    names = [t.function.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InvalidRequest(f"tools has two functions named {duplicate!r}: names must be unique.", param="tools")
    parameters = _parameters(tools)
    single = body.parallel_tool_calls is False
    if choice is None or choice == "auto":
        parser = AUTO_PARSERS.get(auto_parser) if auto_parser else None
        if parser is None:
            return NO_TOOLS
        return ToolPlan(grammar=None, new_parser=lambda: parser(1 if single else None), forced=False, named=False)
    if choice == "required":
        call = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                "required": ["name", "parameters"],
            }
            for name, params in zip(names, parameters)
        ]
        schema = {"type": "array", "items": {"anyOf": call}, "minItems": 1, **({"maxItems": 1} if single else {})}
        grammar = GrammarSpec("json_schema", json.dumps(schema), param="tools")
        return ToolPlan(grammar=grammar, new_parser=lambda: RequiredParser(1 if single else None), forced=True, named=False)
    index = _named(choice, tools)
    grammar = GrammarSpec("json_schema", json.dumps(parameters[index]), param=f"tools[{index}].function.parameters")
    name = names[index]
    return ToolPlan(grammar=grammar, new_parser=lambda: NamedParser(name), forced=True, named=True)
