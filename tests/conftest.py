"""Shared fixtures. The API tests share one real server (tests/api_server.py) for the whole session."""

from api_server import api_server, offline_llm  # noqa: F401  (fixtures)
