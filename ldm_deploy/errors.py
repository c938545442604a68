"""Errors that the command-line tools print as one clear line (no traceback)."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class LdmDeployError(Exception):
    """A user-facing error: bad input, a missing file, a failed check."""


class ValidationError(LdmDeployError):
    """An exported or transformed graph disagrees with its reference beyond tolerance."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type name."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def cli_entry(prog: str) -> Callable[[F], F]:
    """Wrap a CLI ``main`` so that user errors print ``prog: error: ...`` and exit 1 (2 for
    Ctrl-C), while genuine bugs keep their traceback."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def main(*args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                code = fn(*args, **kwargs)
            except LdmDeployError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                sys.exit(1)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)
            sys.exit(code or 0)

        return main  # type: ignore[return-value]

    return wrap
