"""pagedserve: an LLM inference server. `from server import LLM, SamplingParams` is the offline API."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Resolved on first use, so that importing a torch-free part (the scheduler) stays torch-free.
    if name == "LLM":
        from server.llm import LLM

        return LLM
    if name == "SamplingParams":
        from server.request import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'server' has no attribute {name!r}")
