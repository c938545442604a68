"""Put a CLIP tokenizer into an artifact, with a ``tokenizer.json`` the torch-free runtime can load."""

from __future__ import annotations

import shutil
from pathlib import Path

REQUIRED_FILES = ("vocab.json", "merges.txt")
OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_PROBE = "A photograph of an astronaut riding a horse, Café 東京 2024!!"


def write_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Copy the CLIP tokenizer in `src_dir` (a diffusers ``tokenizer/`` folder) to `out_dir`, plus ``tokenizer.json``.

    `out_dir` is the artifact's ``tokenizer/`` folder itself; it is created if needed. ``tokenizer.json`` is the
    `tokenizers` serialisation of the fast CLIP tokenizer built from the same vocabulary and merges, without
    padding or truncation (the runtime does those); it is checked to give transformers' ids on a probe prompt.
    """
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizerFast

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    missing = [name for name in REQUIRED_FILES if not (src_dir / name).is_file()]
    if missing and not (src_dir / "tokenizer.json").is_file():  # transformers 5 saves only tokenizer.json
        raise FileNotFoundError(
            f"{src_dir} is not a CLIP tokenizer directory: missing {', '.join(missing)} (and no tokenizer.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        if (src_dir / name).is_file() and (src_dir / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(src_dir / name, out_dir / name)

    fast = CLIPTokenizerFast.from_pretrained(str(src_dir))
    backend = fast.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(out_dir / "tokenizer.json"))

    expected = fast(_PROBE, add_special_tokens=False)["input_ids"]
    got = Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode(_PROBE, add_special_tokens=False).ids
    if got != expected:
        raise RuntimeError(f"tokenizer.json does not reproduce transformers' ids: {got} != {expected}")
