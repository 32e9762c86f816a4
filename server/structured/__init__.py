"""Grammars for structured outputs: specs, compilation off the step loop, per-request matcher state."""
