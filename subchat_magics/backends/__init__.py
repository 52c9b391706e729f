"""Backends: echo (offline), vllm (in-process), ollama, groq, openai (any compatible server)."""

from .base import Availability, Backend, Finish, GenerationOptions, collect

__all__ = ["Availability", "Backend", "Finish", "GenerationOptions", "collect"]
