"""Line numbers of tables and keys in a TOML text (``tomllib`` reports none for valid files).

A best-effort reader of the layout, enough to point a validation error at its line::

    loc = Locator(text)
    loc.line("settings", None, "steps")          # the `steps = ...` line of [settings]
    loc.line("variant", 2, "build", "calib_size")  # a key of the 3rd [[variant]]'s build table
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ARRAY = re.compile(r"^\s*\[\[\s*([^\]\s]+)\s*\]\]")
_TABLE = re.compile(r"^\s*\[\s*([^\]\s]+)\s*\]")


@dataclass
class _Section:
    name: str
    index: int | None  # position among [[name]] tables, None for [name]
    start: int  # 0-based line of the header (or 0 for the top level)
    end: int = 0  # exclusive


def _key_pattern(key: str, inline: bool) -> re.Pattern[str]:
    k = re.escape(key)
    lead = r"(?:^|[{,\s])" if inline else r"^\s*"
    return re.compile(lead + rf"""(?P<q>["']?){k}(?P=q)\s*=""")


class Locator:
    """Maps (table, array index, key, sub-key) paths to 1-based line numbers."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.sections: list[_Section] = [_Section("", None, 0)]
        counts: dict[str, int] = {}
        for i, raw in enumerate(self.lines):
            line = raw.split("#", 1)[0]
            if m := _ARRAY.match(line):
                name = m.group(1)
                self.sections.append(_Section(name, counts.get(name, 0), i))
                counts[name] = counts.get(name, 0) + 1
            elif m := _TABLE.match(line):
                self.sections.append(_Section(m.group(1), None, i))
        for a, b in zip(self.sections, self.sections[1:]):
            a.end = b.start
        self.sections[-1].end = len(self.lines)

    def _span(self, table: str, index: int | None) -> tuple[int, int] | None:
        """Lines of a table including its sub-tables ``[table.sub]``."""
        for k, s in enumerate(self.sections):
            if s.name == table and s.index == index:
                end = s.end
                for t in self.sections[k + 1:]:
                    if not t.name.startswith(table + "."):
                        break
                    end = t.end
                return s.start, end
        return None

    def _find(self, key: str, lo: int, hi: int, inline: bool) -> int | None:
        pat = _key_pattern(key, inline)
        for i in range(lo, hi):
            if pat.search(self.lines[i].split("#", 1)[0]):
                return i
        return None

    def line(self, table: str, index: int | None = None, key: str | None = None, sub: str | None = None) -> int:
        """1-based line of the most specific part found (falls back to the table header, then 1)."""
        span = self._span(table, index)
        if span is None:
            return 1
        lo, hi = span
        if table and key is None:
            return lo + 1
        if key is None:
            return 1
        # a key of the top level must come before the first table header
        hi = self.sections[1].start if not table and len(self.sections) > 1 else hi
        at = self._find(key, lo, hi, inline=False)
        if at is None:  # maybe a sub-table header [table.key] inside the span
            name = f"{table}.{key}" if table else key
            at = next((s.start for s in self.sections if s.name == name and lo <= s.start < span[1]), None)
        if at is None:
            return lo + 1 if table else 1
        if sub is not None:
            found = self._find(sub, at, hi, inline=True)
            return (found if found is not None else at) + 1
        return at + 1
