"""`classifier:PATH[@LABEL]` and `classifier_pair:PATH[@LABEL]`: a local transformers
sequence-classification checkpoint as a judge.

PATH is a local folder holding a checkpoint that `AutoModelForSequenceClassification` and
`AutoTokenizer` load (config.json, weights, tokenizer files); nothing is fetched from a hub.
The score is the softmax probability of the harmful LABEL over the model's labels. LABEL is a
label name from the checkpoint's `config.id2label` (exact, else case-insensitive when that is
unambiguous) or a label index; without it, a two-label checkpoint uses index 1 (the usual
"positive" class, e.g. LABEL_1 or toxic), and a checkpoint with more labels must name one.
Label names are matched before indices, so a label literally named `1` wins over index 1.
A PATH containing `@` works when that folder exists; otherwise LABEL follows the last `@`.

What the classifier reads:

* `classifier:` the response alone. Most harm and toxicity classifiers are trained on single
  texts, and the response is what production emits: a response that is harmless on its own
  should not become harmful because the prompt was.
* `classifier_pair:` the (prompt, response) text pair, tokenised as the tokenizer's pair input
  (`[CLS] prompt [SEP] response [SEP]` for BERT-like ones), for classifiers trained on
  conversations, where a reply is judged as an answer to its request ("Sure, step 1 ..." is only
  harmful given what was asked).

Inputs longer than the model's limit are truncated (for pairs, the longer text first), so a
classifier only sees the opening of a very long response. Scoring runs in batches of
`batch_size` without gradients, on CPU unless `device` says otherwise. The checkpoint's config is
read when the judge is built, so a missing folder or an unknown label fails at spec parsing;
the weights load on the first call to `score`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from tailmon.engines.base import checkpoint
from tailmon.errors import InputError, RuntimeFailure, SpecError

from .base import Judge

# A tokenizer without a real limit reports model_max_length ~1e30; fall back to the position
# embeddings, or this, so that truncation never asks for more than the model can embed.
_FALLBACK_MAX_LENGTH = 512


def split_classifier_arg(arg: str) -> tuple[str, str | None]:
    """`PATH[@LABEL]` -> (path, label or None); see the module docstring for the rule."""
    arg = arg.strip()
    if Path(arg).expanduser().is_dir() or "@" not in arg:
        return arg, None
    path, _, label = arg.rpartition("@")
    path, label = path.strip(), label.strip()
    if not path:
        raise SpecError("the checkpoint path before '@' is empty")
    if not label:
        raise SpecError("the label after '@' is empty")
    return path, label


def read_labels(path: str) -> list[str]:
    """Label names by index from the checkpoint's config.json (transformers' LABEL_i defaults
    where it names none); `InputError` naming the path when it is not a checkpoint folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputError(f"classifier checkpoint {path!r}: no such directory")
    if not folder.is_dir():
        raise InputError(f"classifier checkpoint {path!r} is not a directory")
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"classifier checkpoint {path!r} has no config.json: "
                         "not a transformers model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"classifier checkpoint {path!r}: cannot read config.json: {exc}") from None
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            by_index = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise InputError(f"classifier checkpoint {path!r}: config.json id2label keys "
                             "must be integers") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise InputError(f"classifier checkpoint {path!r}: config.json id2label must "
                             f"number its labels 0..{len(by_index) - 1}")
        return [by_index[i] for i in range(len(by_index))]
    n = config.get("num_labels", 2)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"classifier checkpoint {path!r}: config.json has no usable id2label")
    return [f"LABEL_{i}" for i in range(n)]


def resolve_label(labels: list[str], label: str | None, path: str) -> tuple[int, str | None]:
    """(index of the harmful label, its canonical spelling for the spec or None for the default)."""
    if label is None:
        if len(labels) == 2:
            return 1, None
        raise InputError(
            f"classifier checkpoint {path!r} has {len(labels)} labels ({', '.join(labels)}): "
            "name the harmful one, classifier:PATH@LABEL"
        )
    unique = len(set(labels)) == len(labels)
    if label in labels:
        index = labels.index(label)
        return index, label if unique else str(index)
    folded = [i for i, name in enumerate(labels) if name.casefold() == label.casefold()]
    if len(folded) == 1:
        index = folded[0]
        return index, labels[index] if unique else str(index)
    if label.isdigit() and int(label) < len(labels):
        index = int(label)
        return index, labels[index] if unique else str(index)
    raise InputError(
        f"classifier checkpoint {path!r} has no label {label!r} "
        f"(labels: {', '.join(f'{i}={name}' for i, name in enumerate(labels))})"
    )


class ClassifierJudge(Judge):
    """Softmax probability of the harmful label of a local sequence classifier.

    `pair` False scores the response alone (`classifier:`), True the (prompt, response) pair
    (`classifier_pair:`).
    """

    def __init__(self, path: str, label: str | None = None, *, pair: bool = False,
                 batch_size: int = 32, device: str = "cpu") -> None:
        super().__init__()
        path = path.strip()
        if not path:
            raise SpecError("the classifier checkpoint path is empty")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.path = path
        self.pair = pair
        self.labels = read_labels(path)
        self.label_index, canonical = resolve_label(
            self.labels, label.strip() if label is not None else None, path
        )
        self.batch_size = batch_size
        self.device = device
        name = "classifier_pair" if pair else "classifier"
        self.spec = f"{name}:{path}" + (f"@{canonical}" if canonical is not None else "")
        self._model = None
        self._tokenizer = None
        self._max_length = _FALLBACK_MAX_LENGTH
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        """The harmful label's name."""
        return self.labels[self.label_index]

    def _ensure_loaded(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            folder = str(Path(self.path).expanduser())
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
                model = AutoModelForSequenceClassification.from_pretrained(folder)
                model = model.to(self.device).eval()
            except Exception as exc:  # any failure inside transformers while loading is the model's
                raise RuntimeFailure(
                    f"classifier checkpoint {self.path!r} failed to load: {exc}"
                ) from exc
            if model.config.num_labels != len(self.labels):
                raise RuntimeFailure(
                    f"classifier checkpoint {self.path!r}: the model has "
                    f"{model.config.num_labels} labels, its config.json {len(self.labels)}"
                )
            if tokenizer.pad_token is None:
                raise RuntimeFailure(f"classifier checkpoint {self.path!r}: the tokenizer "
                                     "defines no padding token, so it cannot batch")
            limits = [tokenizer.model_max_length,
                      getattr(model.config, "max_position_embeddings", None)]
            limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
            self._max_length = min(limits) if limits else _FALLBACK_MAX_LENGTH
            self._tokenizer, self._model = tokenizer, model

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        self._ensure_loaded()
        import torch

        out = np.empty(len(responses), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(responses), self.batch_size):
                end = start + self.batch_size
                texts = (prompts[start:end], responses[start:end]) if self.pair else (responses[start:end],)
                batch = self._tokenizer(
                    *texts, padding=True, truncation=True, max_length=self._max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self._model(**batch).logits.double()
                probs = torch.softmax(logits, dim=-1)[:, self.label_index]
                out[start:end] = probs.cpu().numpy()
                checkpoint()
        return out
