"""Convert the CLIP BPE file shipped in the ``open_clip_torch`` wheel into a Hugging Face
tokenizer directory (``vocab.json`` + ``merges.txt`` + configs) with SD1.x's exact token ids.

Usage:
    python scripts/make_clip_vocab.py [--bpe PATH_TO_bpe_simple_vocab_16e6.txt.gz] [-o DIR]

Without ``--bpe`` the wheel is fetched with ``pip download --no-deps open_clip_torch`` (only the
vocabulary file is read from it; the package is not installed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48 894 merges
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ldm_deploy" / "assets" / "clip_tokenizer"


def byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode table of byte-level BPE, in CLIP's order
    (printable bytes first, then the rest mapped above U+0100); the order fixes the token ids."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_bpe(path: Path | None) -> list[str]:
    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "open_clip_torch"],
                check=True,
            )
            wheel = next(Path(tmp).glob("open_clip_torch-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(BPE_MEMBER)
    elif path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            data = zf.read(BPE_MEMBER)
    else:
        data = path.read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return lines[1 : NUM_MERGES + 1]  # line 0 is a version header


def build_vocab(merges: list[str]) -> dict[str, int]:
    base = list(byte_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer_dir(merges: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    assert len(vocab) == 49408, len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz or an open_clip_torch wheel")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    write_tokenizer_dir(read_bpe(args.bpe), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
