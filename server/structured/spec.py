"""What a request asks its output to follow: plain, serialisable data that crosses the API <-> engine
boundary inside SamplingParams (the engine compiles it; nothing here imports the grammar library)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "ebnf"]


@dataclass(frozen=True)
class GrammarSpec:
    """One grammar. `source` is the JSON schema as JSON text (json_schema), the regex, the EBNF
    grammar, or the choices as a JSON list of strings (choice); empty for json_object."""

    kind: GrammarKind
    source: str = ""
    any_whitespace: bool | None = None  # JSON: free whitespace between tokens; None: the server's default
    param: str = "structured_outputs"  # the request field it came from, named in errors

    @property
    def key(self) -> tuple[str, str, bool | None]:
        """The compile cache key: the same grammar from another field shares its compilation."""
        return (self.kind, self.source, self.any_whitespace)
