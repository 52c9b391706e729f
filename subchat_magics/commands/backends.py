"""%subchat subcommands: choosing a backend, listing them, keys, the environment.

Each takes the magics object (its session, shell and settings) and the words after
the subcommand."""

from __future__ import annotations

from typing import TYPE_CHECKING

from IPython.core.error import UsageError

from .. import keys
from ..secrets import redact

if TYPE_CHECKING:
    from ..magics import SubchatMagics


def backend(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("backend", rest, (("name",), dict(nargs="?")))
    name, source, active = m.session.set_backend(a.name)
    print(f"backend: {name} (from {source}); active: {active}")


def backends(m: "SubchatMagics", rest: list[str]) -> None:
    m._parse("backends", rest)
    for b in m.session.backends():
        av = b.availability
        place = f"auto #{b.auto_place}" if b.auto_place else "by name only"
        extras = "".join([f"; key {b.key_env} (%subchat key {b.name})" if b.key_env else "",
                          f"; own options {', '.join(b.own_options)}" if b.own_options else ""])
        print(f"{b.name:8} {'available' if av.ok else 'not available'}: {redact(av.reason)}"
              f"  [{place}{extras}]")


def key(m: "SubchatMagics", rest: list[str]) -> None:
    known = keys.key_backends()
    names = ", ".join(sorted(known))
    # what was typed is never repeated: a key typed on the line is no known key yet, so
    # no masking would catch it in the message
    if len(rest) > 1 and rest[0] in known:
        raise UsageError(f"%subchat key {rest[0]} takes no key on the line (it would stay in "
                         f"the notebook and its history): run %subchat key {rest[0]} and "
                         "paste it at the hidden prompt")
    if len(rest) != 1 or rest[0] not in known:
        raise UsageError(f"%subchat key takes one backend's name ({names}) and asks for the "
                         "key at a hidden prompt; never type the key on the line")
    a = m._parse("key", rest, (("name",), dict(choices=sorted(known))))
    import getpass

    var = known[a.name]
    try:
        value = getpass.getpass(f"{var} (input hidden): ")
    except (EOFError, OSError, NotImplementedError, KeyboardInterrupt):
        # StdinNotImplementedError (a frontend that takes no input) is a NotImplementedError
        raise UsageError(
            f"%subchat key: cannot ask for the key here (no input available); put {var} "
            "in the environment or in a .env file in the working folder") from None
    keys.set_key(a.name, value)
    print(f"{var} set for this kernel (not saved anywhere)")


def doctor(m: "SubchatMagics", rest: list[str]) -> None:
    m._parse("doctor", rest)
    from ..doctor import doctor

    print(doctor(m.session))
