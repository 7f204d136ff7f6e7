"""Token tilts: an additive bias over the vocabulary applied to the processed next-token
distribution, q(y_t | ctx) = p(y_t | ctx) exp(b[y_t]) / Z(ctx), Z(ctx) = sum_v p(v | ctx) exp(b[v]).

Why this family (issue 17): a judge that reads the whole response fires on a few decisive tokens
(a profane word) anywhere in it. A system prompt or an adapter changes every token's
distribution, so over 16 or 32 tokens the weight p/q of a hit multiplies many factors that have
nothing to do with the event and scatters. A tilt changes the distribution only as much as the
bias asks: with the bias on a few tokens, every other token keeps the target's relative
probabilities, and a response's weight is prod_t Z(ctx_t) / exp(sum_t b[y_t]), which is nearly
constant over responses with the same decisive tokens. The tilt is applied after the decoding's
truncation, so its support is the target's own: it may truncate as the target does.

File format (JSON, small: one entry per biased token):

    {"format": "tailmon-tilt", "version": 1,
     "token_ids": [...], "bias": [...],           # natural-log bias per token id
     "tokens": [...],                             # their text, for people reading the file
     "tokenizer_sha256": "...",                   # the tokenizer the ids belong to (optional)
     "provenance": {...}}                         # how it was fitted (optional)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tailmon.errors import InputError

FORMAT = "tailmon-tilt"
VERSION = 1
# A bias beyond this (e^30 ~ 1e13) says nothing a smaller one does not, and it overflows exp in
# float32 arithmetic downstream; a fitted tilt is clipped well inside it.
MAX_ABS_BIAS = 30.0


@dataclass(frozen=True)
class TiltFile:
    token_ids: np.ndarray
    """int64 token ids, distinct."""
    bias: np.ndarray
    """float64 natural-log bias of each."""
    tokenizer_sha256: str | None = None
    tokens: list[str] | None = None
    provenance: dict = field(default_factory=dict)

    def dense(self, vocab_size: int) -> np.ndarray:
        """The bias over the whole vocabulary (0 for tokens the file does not name)."""
        if self.token_ids.size and int(self.token_ids.max()) >= vocab_size:
            raise InputError(f"token tilt names token id {int(self.token_ids.max())}, outside the model's "
                             f"vocabulary of {vocab_size}")
        out = np.zeros(vocab_size, dtype=np.float64)
        out[self.token_ids] = self.bias
        return out


def load_tilt(path: str | Path) -> TiltFile:
    """Read and check a tilt file: InputError naming the file for any defect."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError:
        raise InputError(f"token tilt file '{path}' does not exist (fit one with `tailmon proposals fit-tilt`)") from None
    except ValueError as exc:
        raise InputError(f"token tilt file '{path}' is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"'{path}' is not a token tilt file (format '{FORMAT}')")
    if doc.get("version") != VERSION:
        raise InputError(f"token tilt file '{path}' has version {doc.get('version')}; this tailmon reads {VERSION}")
    ids, bias = doc.get("token_ids"), doc.get("bias")
    if not isinstance(ids, list) or not isinstance(bias, list) or len(ids) != len(bias):
        raise InputError(f"token tilt file '{path}': token_ids and bias must be lists of one length")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise InputError(f"token tilt file '{path}': token ids must be integers >= 0")
    if len(set(ids)) != len(ids):
        raise InputError(f"token tilt file '{path}': a token id appears twice")
    if any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or abs(b) > MAX_ABS_BIAS
           for b in bias):
        raise InputError(f"token tilt file '{path}': every bias must be a finite number within +/-{MAX_ABS_BIAS:g}")
    return TiltFile(np.asarray(ids, dtype=np.int64), np.asarray(bias, dtype=np.float64),
                    doc.get("tokenizer_sha256"), doc.get("tokens"), doc.get("provenance") or {})


def save_tilt(path: str | Path, token_ids, bias, *, tokenizer_sha256: str | None = None,
              tokens: list[str] | None = None, provenance: dict | None = None) -> Path:
    """Write a tilt file atomically (a reader never sees half of one)."""
    path = Path(path)
    ids = [int(i) for i in token_ids]
    values = [float(np.clip(b, -MAX_ABS_BIAS, MAX_ABS_BIAS)) for b in bias]
    doc = {"format": FORMAT, "version": VERSION, "token_ids": ids, "bias": values}
    if tokens is not None:
        doc["tokens"] = list(tokens)
    if tokenizer_sha256 is not None:
        doc["tokenizer_sha256"] = tokenizer_sha256
    doc["provenance"] = provenance or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path
