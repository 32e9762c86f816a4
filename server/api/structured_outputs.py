"""A request's structured-output fields -> one GrammarSpec for the engine, checked at the edge.

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` (json, regex,
choice, grammar, json_object) and its older `guided_*` names, and TGI's `grammar` all end here.
What only compiling can tell (a regex or grammar the engine cannot read, an unsupported schema
feature, a compilation past its deadline) comes back from the engine as a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from server.api.protocol import SamplingRequest
from server.errors import InvalidRequest
from server.structured.spec import GrammarSpec

_BACKENDS = ("xgrammar", "auto")


def check_schema(schema, param: str, what: str) -> None:
    """400 unless `schema` is a JSON schema (an object valid against its draft's meta-schema)."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}: {what} must be a JSON schema object.", param=param)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidRequest(
            f"{param}: {what} is not a valid JSON schema: {exc.message}" + (f" (at {where})." if where else "."), param=param
        ) from None


def _json_text(value: Any, param: str) -> str:
    """A JSON schema given as an object or as JSON text -> its JSON text, checked against its meta-schema."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequest(f"{param}: the JSON schema is not valid JSON: {exc}.", param=param) from None
    check_schema(value, param, "the schema")
    return json.dumps(value)


def _choice_text(choices: list[str], param: str) -> str:
    if not choices:
        raise InvalidRequest(f"{param}: give at least one choice.", param=param)
    return json.dumps(choices)


def _one(found: list[GrammarSpec]) -> GrammarSpec | None:
    if len(found) > 1:
        names = " and ".join(spec.param for spec in found)
        raise InvalidRequest(f"Only one structured output per request: {names} were both given.", param=found[1].param)
    return found[0] if found else None


def _vllm_fields(body: SamplingRequest) -> list[GrammarSpec]:
    found: list[GrammarSpec] = []
    so = body.structured_outputs
    whitespace = None
    if so is not None:
        if so.whitespace_pattern is not None:
            raise InvalidRequest(
                "structured_outputs.whitespace_pattern is not supported: use disable_any_whitespace "
                "(true: fixed separators; false: any whitespace).",
                param="structured_outputs.whitespace_pattern",
            )
        if so.structural_tag is not None:
            raise InvalidRequest(
                "structured_outputs.structural_tag is not supported: use json, regex, choice or grammar.",
                param="structured_outputs.structural_tag",
            )
        if so.disable_any_whitespace is not None:
            whitespace = not so.disable_any_whitespace
        if so.json_ is not None:
            found.append(GrammarSpec("json_schema", _json_text(so.json_, "structured_outputs.json"), whitespace, "structured_outputs.json"))
        if so.regex is not None:
            found.append(GrammarSpec("regex", so.regex, None, "structured_outputs.regex"))
        if so.choice is not None:
            param = "structured_outputs.choice"
            found.append(GrammarSpec("choice", _choice_text(so.choice, param), None, param))
        if so.grammar is not None:
            found.append(GrammarSpec("ebnf", so.grammar, None, "structured_outputs.grammar"))
        if so.json_object:
            found.append(GrammarSpec("json_object", "", whitespace, "structured_outputs.json_object"))
        if not found:
            raise InvalidRequest(
                "structured_outputs needs one of json, regex, choice, grammar or json_object.", param="structured_outputs"
            )
    if body.guided_whitespace_pattern:
        raise InvalidRequest(
            "guided_whitespace_pattern is not supported: use structured_outputs.disable_any_whitespace.",
            param="guided_whitespace_pattern",
        )
    backend = body.guided_decoding_backend
    if backend and backend not in _BACKENDS:
        raise InvalidRequest(
            f"guided_decoding_backend {backend!r} is not available: this server's grammar engine is xgrammar.",
            param="guided_decoding_backend",
        )
    if body.guided_json is not None:
        found.append(GrammarSpec("json_schema", _json_text(body.guided_json, "guided_json"), None, "guided_json"))
    if body.guided_regex is not None:
        found.append(GrammarSpec("regex", body.guided_regex, None, "guided_regex"))
    if body.guided_choice is not None:
        found.append(GrammarSpec("choice", _choice_text(body.guided_choice, "guided_choice"), None, "guided_choice"))
    if body.guided_grammar is not None:
        found.append(GrammarSpec("ebnf", body.guided_grammar, None, "guided_grammar"))
    return found


def _response_format(body: SamplingRequest) -> list[GrammarSpec]:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return []
    if fmt.type == "json_object":
        return [GrammarSpec("json_object", "", None, "response_format")]
    param = "response_format.json_schema"
    if fmt.json_schema is None:
        raise InvalidRequest(f"response_format of type 'json_schema' needs {param}.", param=param)
    schema = fmt.json_schema.schema_
    if schema is None:
        raise InvalidRequest(f"{param}.schema is missing: give the JSON schema the reply must follow.", param=f"{param}.schema")
    return [GrammarSpec("json_schema", _json_text(schema, f"{param}.schema"), None, f"{param}.schema")]


def grammar_spec(body: SamplingRequest) -> GrammarSpec | None:
    """The one grammar a completions or chat request asks for, or None."""
    return _one(_response_format(body) + _vllm_fields(body))


def tgi_grammar_spec(grammar: dict[str, Any] | None) -> GrammarSpec | None:
    """TGI's `grammar` parameter: {"type": "json" | "json_schema", "value": schema} or {"type": "regex", "value": str}."""
    if grammar is None:
        return None
    param = "parameters.grammar"
    kind, value = grammar.get("type"), grammar.get("value")
    unknown = sorted(set(grammar) - {"type", "value"})
    if unknown:
        raise InvalidRequest(f"{param}: unknown field(s) {', '.join(unknown)}; give type and value.", param=param)
    if kind in ("json", "json_schema"):
        if value is None:
            raise InvalidRequest(f"{param}.value: give the JSON schema.", param=f"{param}.value")
        return GrammarSpec("json_schema", _json_text(value, f"{param}.value"), None, f"{param}.value")
    if kind == "regex":
        if not isinstance(value, str):
            raise InvalidRequest(f"{param}.value: a regex grammar needs the pattern as a string.", param=f"{param}.value")
        return GrammarSpec("regex", value, None, f"{param}.value")
    raise InvalidRequest(f"{param}.type must be 'json' or 'regex', got {kind!r}.", param=f"{param}.type")
