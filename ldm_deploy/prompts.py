"""Prompt files, read the same way by every stage: one prompt per line (blank lines and lines
starting with ``#`` skipped), or a JSON list / COCO captions file (``annotations[].caption``)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LdmDeployError


def read_prompt_file(path: Path | str, what: str = "prompt file") -> list[str]:
    """The prompts in ``path``; a missing, unreadable or empty file is one :class:`LdmDeployError` line."""
    p = Path(path)
    if not p.is_file():
        raise LdmDeployError(f"{what} {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LdmDeployError(f"cannot read {what} {path}: {e}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LdmDeployError(f"{what} {path} is not valid JSON ({e})") from None
        items = data.get("annotations", []) if isinstance(data, dict) else data
        prompts = [str(a["caption"] if isinstance(a, dict) else a).strip() for a in items]
        prompts = [s for s in prompts if s]
    else:
        prompts = [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]
    if not prompts:
        raise LdmDeployError(f"{what} {path} has no prompts")
    return prompts
