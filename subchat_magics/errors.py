"""One error hierarchy. The magics layer turns these into ``UsageError``;
every message says what to do next."""

from __future__ import annotations


class SubchatError(Exception):
    """Base class of every error subchat-magics raises on purpose."""


class ChatNotFound(SubchatError):
    """A chat path that does not exist (or whose parent does not exist)."""


class InvalidInput(SubchatError):
    """A bad path, flag value or cell body."""


class StoreError(SubchatError):
    """The chat store cannot be opened, read or written."""


class BackendError(SubchatError):
    """A backend failed. ``reason`` is a short tag stored with a cut reply
    (``connection``, ``auth``, ``rate-limit``, ``model``, ``stream``, ``timeout``...)."""

    def __init__(self, message: str, *, reason: str = "backend", retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class BackendUnavailable(BackendError):
    """A backend cannot be used at all here (SDK missing, no model loaded, no key)."""

    def __init__(self, message: str, *, reason: str = "unavailable"):
        super().__init__(message, reason=reason)
