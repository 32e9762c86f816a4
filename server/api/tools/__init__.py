"""Tool calling on chat completions: tool_choice planning and the parsers that read calls out of the text."""
