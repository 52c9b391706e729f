"""The seed notebook's spelling: ``SimpleLLMClient().generate_response(node, prompt)``."""

from __future__ import annotations

from typing import Any, Iterator

from .backends.base import GenerationOptions
from .session import Session, check_backend_name, default_session
from .tree import Chat


class SimpleLLMClient:
    """Send ``prompt`` into chat ``node`` (a :class:`Chat` or a path) with the same backend
    selection as the magics; the turn is recorded in the tree."""

    def __init__(self, backend: str | None = None, session: Session | None = None, **options: Any):
        """``options`` are generation options (``max_tokens``, ``temperature``, ``top_p``,
        ``stop``, ``seed``, ``model``, ``think``): an unknown one is a ``TypeError``
        naming it, a bad value an error, here rather than at the first reply."""
        self.session = session or default_session()
        if backend is not None:
            check_backend_name(backend, "SimpleLLMClient(backend=...)")
        GenerationOptions().replace(**options)  # names and values checked once, now
        self.backend = backend
        self.options = options

    def _turn(self, node: "Chat | str | None", prompt: str, **options: Any):
        path = node.path if isinstance(node, Chat) else node
        return self.session.send(path, prompt, backend=self.backend, **{**self.options, **options})

    def generate_response(self, node: "Chat | str | None", prompt: str, **options: Any) -> str:
        turn = self._turn(node, prompt, **options)
        turn.run()
        return turn.text

    def generate_response_stream(self, node: "Chat | str | None", prompt: str,
                                 **options: Any) -> Iterator[str]:
        yield from self._turn(node, prompt, **options)
