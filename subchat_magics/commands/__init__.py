"""The subcommands of ``%subchat``, one module per subject (``view``, ``edit``,
``storage``, ``backends``, ``explain``): each is a function ``(magics, words)``. The magic
parses the line and routes here; these parse their own words, call the core and display."""

from __future__ import annotations

from typing import Any, Callable

from . import backends, edit, explain, storage, view

COMMANDS: dict[str, Callable[[Any, list[str]], Any]] = {
    "tree": view.tree,
    "show": view.show,
    "status": view.status,
    "use": edit.use,
    "rename": edit.rename,
    "system": edit.system,
    "delete": edit.delete,
    "reopen": storage.reopen,
    "copy-to": storage.copy_to,
    "export": storage.export_chats,
    "import": storage.import_chats,
    "backend": backends.backend,
    "backends": backends.backends,
    "key": backends.key,
    "doctor": backends.doctor,
    "explain": explain.explain,
}
