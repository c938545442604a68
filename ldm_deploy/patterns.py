"""Name patterns shared by the CLIs (``--exclude``, ``--keep``): ``re:<regex>``, a glob, or plain."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

from .errors import LdmDeployError


def name_matcher(pattern: str, plain: Callable[[str, str], bool], label: str) -> Callable[[str], bool]:
    """A predicate on names: ``re:<regex>`` (searched), a glob with ``* ? [ ]``, else
    ``plain(pattern, name)``. A bad regex is a clear error naming ``label``."""
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise LdmDeployError(f"bad {label} regex {pattern!r}: {e}") from None
        return lambda name: rx.search(name) is not None
    if any(c in pattern for c in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    return lambda name: plain(pattern, name)
