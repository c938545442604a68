"""``--keep`` patterns: which U-Net modules stay intact."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from ..errors import LdmDeployError
from ..patterns import name_matcher


def matcher(pattern: str) -> Callable[[str], bool]:
    """``re:<regex>`` (searched), a glob with ``* ? [ ]``, or a module name (that module and
    everything under it)."""
    return name_matcher(pattern, lambda p, name: name == p or name.startswith(p + "."), "--keep")


def match_keep(module_names: Iterable[str], patterns: Sequence[str]) -> dict[str, str]:
    """Map every kept module name (matches and their submodules) to the pattern that kept it.

    A pattern that matches no module is an error."""
    names = [n for n in module_names if n]
    kept: dict[str, str] = {}
    for p in patterns:
        hits = [n for n in names if matcher(p)(n)]
        if not hits:
            raise LdmDeployError(f"--keep pattern {p!r} matches no module of the U-Net "
                                 "(module names look like 'mid_block', 'down_blocks.1.attentions.0')")
        for h in hits:
            for n in names:
                if n == h or n.startswith(h + "."):
                    kept.setdefault(n, p)
    return kept
