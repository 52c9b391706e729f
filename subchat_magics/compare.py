"""A comparison (``--compare A,B``): the same message to several backends or models at
once, each into a sibling subchat named after its model, streaming side by side.

Each entry is a backend id or ``backend:model`` (``vllm,groq:llama-3.3-70b-versatile``),
planned on its own (named, so it must be set up, and it must take every option) before
anything is stored. Each model's exchanges run through its own
:class:`~subchat_magics.exchange.Runner`; the runners are stepped in turn.

A thin caller of the exchange, like :mod:`subchat_magics.turn`.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .backends.base import Backend
from .backends.registry import Selection
from .errors import InvalidInput, SubchatError
from .exchange import Exchange, Runner, check_backend_name

MARK = "compare"  # the provenance key of each model's reply
_UNSAFE = re.compile(r"[^\w.\-]")


@dataclass
class Entry:
    """One side of a comparison: a backend and, optionally, a model of it."""

    backend: str
    model: str | None = None

    @property
    def spec(self) -> str:
        return self.backend + (f":{self.model}" if self.model else "")


def parse_entries(spec: "str | Sequence[str]") -> list[Entry]:
    """``"vllm,groq:llama-3.3"`` (or a list of such) as entries; refused: fewer than two,
    ``auto``, an unknown backend, a repeated entry."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    entries = []
    for raw in parts:
        raw = str(raw).strip()
        if not raw:
            continue
        name, _, model = raw.partition(":")
        backend = check_backend_name(name, "--compare")
        if backend == "auto":
            raise InvalidInput("--compare names the backends to compare (e.g. --compare "
                               "vllm,groq:llama-3.3-70b-versatile), not auto")
        entries.append(Entry(backend, model.strip() or None))
    if len(entries) < 2:
        raise InvalidInput("--compare needs two or more backends or backend:model entries, "
                           f"e.g. --compare echo,echo:other, not {spec!r}")
    specs = [e.spec for e in entries]
    if len(set(specs)) != len(specs):
        raise InvalidInput(f"--compare names {', '.join(specs)}: each entry once")
    return entries


def column_names(entries: list[Entry], backends: list[Backend],
                 models: "Sequence[str | None] | None" = None) -> list[str]:
    """A name per entry, after its model (its subchat and its column): the model given,
    else the model its request was planned with (``models``: ``-m`` for the entries that
    name none), else the backend's default model, else the backend; made unique with the
    backend."""
    names = []
    for e, b, planned in zip(entries, backends, models or [None] * len(entries)):
        model = e.model or planned or b.default_model() or b.id
        names.append(_UNSAFE.sub("_", model.rstrip("/").rpartition("/")[2])[:80] or b.id)
    if len(set(names)) != len(names):
        names = [_UNSAFE.sub("_", f"{e.backend}-{n}")[:100] for e, n in zip(entries, names)]
    if len(set(names)) != len(names):
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return names


class Compare:
    """The same message into each model's sibling subchat. Iterate for ``(i, delta)``;
    afterwards ``exchanges[i]`` holds model ``i``'s reply and :attr:`values` the answers."""

    def __init__(self, exchanges: list[Exchange], selections: list[Selection], names: list[str]):
        if len(exchanges) != len(selections) or len(exchanges) < 2:
            raise SubchatError("a comparison needs two or more exchanges, one per selection")
        self.exchanges = exchanges
        self.selections = selections
        self.names = names
        for name, ex, sel in zip(names, exchanges, selections):
            ex.provenance[MARK] = {"name": name, "of": [n for n in names],
                                   "entry": sel.requested}
        self.errors: list[BaseException] = []
        self._cancel = threading.Event()
        self._started = False

    @property
    def values(self) -> dict[str, Any]:
        return {n: (ex.value if ex.options.constraint is not None else ex.text)
                if ex.reply is not None and ex.reply.status == "complete" else None
                for n, ex in zip(self.names, self.exchanges)}

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> dict[str, Any]:
        for _ in self:
            pass
        return self.values

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self._started:
            raise SubchatError("a comparison can be run only once")
        self._started = True
        return self._stream()

    def _stream(self) -> Iterator[tuple[int, str]]:
        runners = [Runner(sel, size=1, join_s=5.0) for sel in self.selections]
        where = {id(ex): i for i, ex in enumerate(self.exchanges)}
        try:
            with self.exchanges[0].tree.store.transaction():  # every model's message: one commit
                for r, ex in zip(runners, self.exchanges):
                    r.begin([ex])
            for r, ex in zip(runners, self.exchanges):
                r.submit([ex])
            while any(r.flying for r in runners):
                for r in runners:
                    if r.flying:
                        got = r.step(0.01)
                        if got is not None:
                            yield where[id(got[0])], got[1]
                if self._cancel.is_set():
                    raise KeyboardInterrupt
        except BaseException as exc:
            for r in runners:
                r.close(exc)
            raise
        for r in runners:
            r.close()
            if r.first_error is not None:
                self.errors.append(r.first_error)


__all__ = ["Compare", "Entry", "parse_entries", "column_names", "MARK"]
