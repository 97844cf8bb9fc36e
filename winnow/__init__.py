"""Winnow: an OpenAI-compatible, self-hosted LLM inference server."""

__version__ = "0.1.0"
