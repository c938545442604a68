"""The torch-free CLIP tokenizer against transformers' CLIPTokenizer and a plain-Python CLIP BPE."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")

from ldm_deploy.export.tokenizer import write_tokenizer  # noqa: E402
from ldm_deploy.runtime.tokenizer import ClipTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "ldm_deploy" / "assets" / "clip_tokenizer"
BOS, EOS = 49406, 49407
ASTRONAUT = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]

PROMPTS = [
    "",
    " ",
    "a photograph of an astronaut riding a horse",
    "A PHOTOGRAPH OF AN ASTRONAUT RIDING A HORSE",
    "Café crème brûlée, naïve façade, Ångström, Straße",
    "Cafe\u0301 decomposed accent",  # NFC turns this into "Café"
    "🚀🐴 a rocket horse under the 🌕, 👩‍🚀",
    "東京の夜景、ネオンが輝く",
    "한국어 프롬프트 and Ελληνικά and русский",
    "Hello, world!!! 1234 3.14159 $100 #tag @user (x) [y] {z} <a> a/b\\c ~_~ 50% 1st",
    "   extra   spaces\tand\nnewlines\r\n  ",
    "it's don't we're I've I'm you'll he'd IT'S",
    "masterpiece, best quality, (ultra-detailed:1.2), 8k uhd, [[bokeh]], trending on artstation",
    "pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious",
    "x" * 300,
]
LONG = "a red cube on a blue sphere, " * 12  # ~96 tokens


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "tokenizer"
    write_tokenizer(SRC, out)
    return out


@pytest.fixture(scope="module")
def ours(tok_dir) -> ClipTokenizer:
    return ClipTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def reference():
    return transformers.CLIPTokenizer.from_pretrained(str(SRC))


def hf_ids(reference, prompts) -> np.ndarray:
    return np.array(reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


# --- an independent plain-Python CLIP BPE (NFC standing in for ftfy), to check the tokenizers config itself ---

@lru_cache(maxsize=1)
def _bpe_tables():
    vocab = json.loads((SRC / "vocab.json").read_text(encoding="utf-8"))
    lines = (SRC / "merges.txt").read_text(encoding="utf-8").splitlines()
    ranks = {tuple(line.split()): i for i, line in enumerate(x for x in lines if x and not x.startswith("#version"))}
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_chr, extra = {}, 0
    for b in range(256):
        if b in printable:
            byte_chr[b] = chr(b)
        else:
            byte_chr[b] = chr(256 + extra)
            extra += 1
    return vocab, ranks, byte_chr


def _bpe(word: str, ranks: dict) -> list[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        first, second = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def plain_clip_ids(text: str) -> list[int]:
    vocab, ranks, byte_chr = _bpe_tables()
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = []
    for word in regex.findall(pattern, text):
        ids += [vocab[piece] for piece in _bpe("".join(byte_chr[b] for b in word.encode("utf-8")), ranks)]
    ids = [BOS] + ids[:75] + [EOS]
    return ids + [EOS] * (77 - len(ids))


# --- tests ---

def test_written_dir(tok_dir):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        assert (tok_dir / name).is_file(), name
    assert (tok_dir / "vocab.json").read_bytes() == (SRC / "vocab.json").read_bytes()
    spec = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["padding"] is None and spec["truncation"] is None


def test_write_tokenizer_rejects_non_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_tokenizer(tmp_path, tmp_path / "out")


def test_special_ids(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.max_length) == (BOS, EOS, EOS, 77)


def test_known_ids(ours):
    ids = ours("a photograph of an astronaut riding a horse")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0].tolist() == ASTRONAUT + [EOS] * (77 - len(ASTRONAUT))
    assert ours("").tolist() == [[BOS] + [EOS] * 76]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_transformers(ours, reference, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(prompt)
    np.testing.assert_array_equal(got, hf_ids(reference, [prompt]))
    assert got[0].tolist() == plain_clip_ids(prompt)


def test_case_and_normalisation(ours):
    assert ours("A PHOTOGRAPH OF AN ASTRONAUT RIDING A HORSE")[0].tolist()[:10] == ASTRONAUT
    np.testing.assert_array_equal(ours("Cafe\u0301"), ours("Café"))
    np.testing.assert_array_equal(ours("  a   photograph\tof an\nastronaut riding a horse "), ours(PROMPTS[2]))


def test_literal_special_token_text(ours, reference):
    prompt = "a cat <|endoftext|> a dog"
    np.testing.assert_array_equal(ours(prompt), hf_ids(reference, [prompt]))


def test_batch_equals_one_by_one(ours, reference):
    prompts = PROMPTS + [LONG]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = ours(prompts)
        single = np.concatenate([ours(p) for p in prompts])
    assert batch.shape == (len(prompts), 77) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, single)
    np.testing.assert_array_equal(batch, hf_ids(reference, prompts))
    assert ours([]).shape == (0, 77)


def test_truncation_warns_with_count(ours, reference):
    n_tokens = len(reference(LONG, add_special_tokens=False).input_ids)
    assert n_tokens > 75
    with pytest.warns(UserWarning, match=rf"\b{n_tokens - 75} tokens\b") as record:
        ids = ours(["a short prompt", LONG])
    assert len(record) == 1
    np.testing.assert_array_equal(ids, hf_ids(reference, ["a short prompt", LONG]))
    assert ids[1, 0] == BOS and ids[1, -1] == EOS and (ids[1, 1:-1] != EOS).all()


def test_length_boundaries(ours, reference):
    fits = " ".join(["cat"] * 75)  # "cat" is one token: exactly fills the 77 slots
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = ours(fits)
    assert ids[0].tolist() == [BOS] + [ours("cat")[0, 1]] * 75 + [EOS]
    with pytest.warns(UserWarning, match=r"\b1 tokens\b"):
        over = ours(fits + " cat")
    np.testing.assert_array_equal(over, ids)
    np.testing.assert_array_equal(over, hf_ids(reference, [fits + " cat"]))


def test_pad_token_from_config(tmp_path, reference):
    """SD 2.x tokenizers pad with "!" (id 0) instead of eos; the config decides."""
    out = tmp_path / "tokenizer"
    write_tokenizer(SRC, out)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((out / name).read_text())
        config["pad_token"] = "!"
        (out / name).write_text(json.dumps(config))
    tok = ClipTokenizer.from_dir(out)
    assert tok.pad_token_id == 0
    sd2 = transformers.CLIPTokenizer.from_pretrained(str(out))
    prompts = ["a photograph of an astronaut riding a horse", ""]
    np.testing.assert_array_equal(tok(prompts), hf_ids(sd2, prompts))
    assert tok(prompts)[0, 10:].tolist() == [0] * 67


def test_bad_input(ours):
    with pytest.raises(TypeError):
        ours(["ok", 3])


def test_runtime_modules_need_no_torch_or_transformers():
    code = (
        "import sys; import ldm_deploy.runtime.tokenizer, ldm_deploy.runtime.scheduler; "
        "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
