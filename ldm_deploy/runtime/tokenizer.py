"""CLIP tokenizer for the text encoder, through the `tokenizers` library (no transformers, no torch)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import LdmDeployError, first_line


def _token_str(value: object) -> str | None:
    """A special token as written in a transformers config: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ClipTokenizer:
    """Turns prompts into the [N, max_length] int32 ids that SD's `CLIPTokenizer(padding="max_length",
    max_length=77, truncation=True)` gives: bos, the prompt's tokens, eos, then pad tokens. Over-long prompts
    are cut to `max_length - 2` tokens (bos and eos always stay), with a warning.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int = 77,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str | None = None,
    ):
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_length = int(max_length)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token if pad_token is not None else eos_token)

    def _id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> "ClipTokenizer":
        """Load ``tokenizer.json`` from `path`; ``tokenizer_config.json`` and ``special_tokens_map.json``, when
        present, give the max length and the special tokens (SD 2.x pads with "!", SD 1.x with eos)."""
        path = Path(path)
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                try:
                    loaded = json.loads((path / name).read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise LdmDeployError(f"{path / name} is not valid JSON: {e}") from None
                if not isinstance(loaded, dict):
                    raise LdmDeployError(f"{path / name} is not a JSON object")
                config.update(loaded)
        kwargs = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token = _token_str(config.get(key))
            if token is not None:
                kwargs[key] = token
        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 1_000_000:  # transformers writes 1e30 for "unset"
            max_length = 77
        file = path / "tokenizer.json"
        if not file.is_file():
            raise LdmDeployError(f"tokenizer file {file} is missing")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise LdmDeployError(f"{file} is not a valid tokenizers file: {first_line(e)}") from None
        try:
            return cls(tokenizer, max_length=max_length, **kwargs)
        except ValueError as e:
            raise LdmDeployError(f"{file}: {e}") from None

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Token ids, int32 of shape [len(prompts), max_length] (one row for a single string)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a string or a list of strings")
        keep = self.max_length - 2
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        truncated = []
        for row, encoding in enumerate(self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = encoding.ids
            if len(tokens) > keep:
                dropped = tokens[keep:]
                text = self._tokenizer.decode(dropped).replace("</w>", " ").strip()
                truncated.append(f"prompt {row} lost {len(dropped)} tokens ({text!r})")
                tokens = tokens[:keep]
            ids[row, 0] = self.bos_token_id
            ids[row, 1 : len(tokens) + 1] = tokens
            ids[row, len(tokens) + 1] = self.eos_token_id
        if truncated:
            warnings.warn(
                f"CLIP handles at most {keep} prompt tokens, the rest was truncated: " + "; ".join(truncated)
                + " (long_prompts=True / --long-prompts on an artifact exported with ldm-export --long-prompts "
                "encodes them in 77-token windows)",
                UserWarning,
                stacklevel=2,
            )
        return ids

    def chunks_needed(self, prompts: list[str]) -> int:
        """77-token windows (``max_length - 2`` prompt tokens each) the longest prompt needs (>= 1)."""
        keep = self.max_length - 2
        lengths = [len(e.ids) for e in self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)]
        return max(1, *(-(-n // keep) for n in lengths))

    def chunked(self, prompts: list[str], n_chunks: int) -> np.ndarray:
        """Token ids in ``n_chunks`` windows per prompt, int32 [len(prompts), n_chunks, max_length]:
        each window holds the next ``max_length - 2`` tokens wrapped in bos/eos and padded (a prompt
        that ends early gets empty windows: bos, eos, padding). Tokens past the last window are cut
        with a warning."""
        keep = self.max_length - 2
        ids = np.full((len(prompts), n_chunks, self.max_length), self.pad_token_id, dtype=np.int32)
        truncated = []
        for row, encoding in enumerate(self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = encoding.ids
            if len(tokens) > keep * n_chunks:
                truncated.append(f"prompt {row} lost {len(tokens) - keep * n_chunks} tokens")
            for c in range(n_chunks):
                part = tokens[c * keep:(c + 1) * keep]
                ids[row, c, 0] = self.bos_token_id
                ids[row, c, 1:len(part) + 1] = part
                ids[row, c, len(part) + 1] = self.eos_token_id
        if truncated:
            warnings.warn(f"long prompts take at most {n_chunks} windows of {keep} tokens, the rest was truncated: "
                          + "; ".join(truncated), UserWarning, stacklevel=2)
        return ids
