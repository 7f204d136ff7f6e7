"""Prompt files: JSON (a list of strings or of objects), JSONL, or CSV.

An object's text is its `prompt`, `instruction` or `goal` field (the first present); `category`
is kept when there is one. CSV files need a `prompt` or `goal` column.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from tailmon.errors import InputError

TEXT_FIELDS = ("prompt", "instruction", "goal")


@dataclass(frozen=True)
class PromptItem:
    text: str
    category: str | None = None


def _item(value, where: str) -> PromptItem:
    if isinstance(value, str):
        text, category = value, None
    elif isinstance(value, dict):
        field = next((f for f in TEXT_FIELDS if f in value), None)
        if field is None:
            raise InputError(f"{where}: an object needs one of the fields {', '.join(TEXT_FIELDS)}")
        text, category = value[field], value.get("category")
    else:
        raise InputError(f"{where}: expected a string or an object, got {type(value).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: the prompt text is empty or not a string")
    return PromptItem(text, None if category is None else str(category))


def load_prompts(path: str | Path) -> list[PromptItem]:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompts file {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        items = _load_csv(path, raw)
    elif suffix == ".jsonl":
        items = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                items.append(_item(value, f"{path}:{number}"))
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); use .jsonl or .csv for other formats") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of prompts")
        items = [_item(v, f"{path}: item {i}") for i, v in enumerate(data)]
    if not items:
        raise InputError(f"{path}: no prompts")
    return items


def _load_csv(path: Path, raw: str) -> list[PromptItem]:
    reader = csv.DictReader(raw.splitlines())
    columns = reader.fieldnames or []
    field = next((f for f in TEXT_FIELDS if f in columns), None)
    if field is None:
        raise InputError(f"{path}: a CSV needs a 'prompt' or 'goal' column, found {', '.join(columns) or 'none'}")
    items = []
    for number, row in enumerate(reader, 2):
        items.append(_item({k: v for k, v in row.items() if k in (field, "category") and v is not None}, f"{path}:{number}"))
    return items
