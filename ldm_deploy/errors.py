"""Errors that the command-line tools print as one clear line (no traceback)."""

from __future__ import annotations

import errno
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


#: OSErrors that the machine or the user's paths cause (a full disk, a read-only or foreign
#: directory, a file where a directory should be), not bugs: one line, no traceback.
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EISDIR", "EEXIST", "ENOTEMPTY",
        "ENAMETOOLONG", "EMFILE", "ENFILE", "EIO", "EXDEV", "ELOOP",
    ) if hasattr(errno, name)
)

#: Optional dependencies -> the extra that installs them (``pip install 'ldm-deploy[extra]'``).
EXTRAS = {
    "torch": "export", "diffusers": "export", "transformers": "export", "safetensors": "export",
    "accelerate": "export", "peft": "export", "onnx": "export", "onnxscript": "export", "onnxconverter_common": "export",
    "scipy": "bench", "matplotlib": "bench", "ray": "ray", "torch_pruning": "prune",
    "tensorrt": "tensorrt", "polygraphy": "tensorrt", "cuda": "tensorrt",
    "openvino": "openvino", "nncf": "openvino",
    "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "httpx": "serve", "starlette": "serve",
}


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (a CLI error is always exactly one line)."""
    return " ".join(s.strip() for s in str(text).splitlines() if s.strip())


def user_error(e: BaseException) -> str | None:
    """The one-line message of an exception that is the user's or the machine's doing rather than a
    bug (see :data:`ENVIRONMENT_ERRNOS`, :data:`EXTRAS`), or None."""
    if isinstance(e, LdmDeployError):
        return one_line(str(e))
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in EXTRAS:
        top = (e.name or "").split(".")[0]
        return f"{top} is not installed; it comes with pip install 'ldm-deploy[{EXTRAS[top]}]'"
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
        where = f": {e.filename}" if e.filename else ""
        return one_line(f"{e.strerror or e}{where}")
    return None


def cli_entry(prog: str) -> Callable[[F], F]:
    """Wrap a CLI ``main`` so that user errors (and a full disk, a read-only output, a missing
    optional dependency: :func:`user_error`) print ``prog: error: ...`` as one line and exit 1
    (130 for Ctrl-C), while genuine bugs keep their traceback."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def main(*args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                code = fn(*args, **kwargs)
            except (LdmDeployError, ModuleNotFoundError, OSError) as e:
                message = user_error(e)
                if message is None:
                    raise
                print(f"{prog}: error: {message}", file=sys.stderr)
                sys.exit(1)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)
            sys.exit(code or 0)

        return main  # type: ignore[return-value]

    return wrap
