"""Prompt files: JSON (a list of strings or of objects), JSONL, or CSV, each optionally gzipped.

An object's text is its `prompt`, `instruction` or `goal` field (the first present); `category`
is kept when there is one. CSV files need a `prompt` or `goal` column.

`load_prompts` reads a whole file for `tailmon estimate` and stops at the first bad record.
`iter_records` is the streaming reader underneath it, shared with the daemon's prompt sources
(`tailmon.estimation.sources`): it yields a `RecordError` in place of each bad record instead of
raising, so that a log reader can skip a torn line and go on. JSONL and CSV are read a line at
a time; a JSON list is necessarily parsed whole, so large files should be JSONL. Bounds (README
"Limits"): a JSONL line at most 1 MiB, a CSV field at most the csv module's 128 KiB, a JSON-list
file at most 256 MiB; past them the file's reading ends with one error naming the line.

A prompt's text is kept exactly as stored (no stripping, no newline translation inside CSV
fields): the model must see what production served.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tailmon.errors import InputError
from tailmon.limits import MAX_JSON_PROMPTS_BYTES, MAX_PROMPT_LINE_BYTES, read_limited, size_text

TEXT_FIELDS = ("prompt", "instruction", "goal")
FORMATS = ("jsonl", "json", "csv")

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
# Rotation suffixes: app.jsonl.1, app.jsonl-20240101 (before any .gz).
_ROTATION = re.compile(r"(?:[.-]\d+)+$")
_MISSING = object()


@dataclass(frozen=True)
class PromptItem:
    text: str
    category: str | None = None


class RecordError(InputError):
    """One line, row or item of a prompt file that is not a prompt.

    `torn` marks a failure that an interrupted write explains (an unterminated last line, a
    gzip stream cut short): log readers skip those without counting them as evidence that the
    file is in the wrong format.
    """

    def __init__(self, message: str, *, torn: bool = False):
        super().__init__(message)
        self.torn = torn


def _lookup(record: dict, name: str):
    # A literal key wins; otherwise a dotted name walks nested objects (request.prompt).
    if name in record:
        return record[name]
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def parse_record(value, where: str, *, text_field: str | None = None,
                 category_field: str | None = None) -> PromptItem:
    """The prompt in one decoded record (a string or an object); RecordError naming `where` if none.

    `text_field` None means the first of prompt / instruction / goal present; `category_field`
    None means `category`. A missing category is None; a missing text field is an error.
    """
    if isinstance(value, str):
        text, category = value, None
    elif isinstance(value, dict):
        if text_field is None:
            field = next((f for f in TEXT_FIELDS if f in value), None)
            if field is None:
                raise RecordError(f"{where}: an object needs one of the fields {', '.join(TEXT_FIELDS)}")
            text = value[field]
        else:
            text = _lookup(value, text_field)
            if text is _MISSING:
                raise RecordError(f"{where}: no field '{text_field}'")
        category = _lookup(value, category_field or "category")
        if category is _MISSING:
            category = None
    else:
        raise RecordError(f"{where}: expected a string or an object, got {type(value).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise RecordError(f"{where}: the prompt text is empty or not a string")
    category = None if category is None else str(category)
    for what, value in (("prompt text", text), ("category", category)):
        # JSON may escape lone surrogates ("\ud83d"), which no UTF-8 text holds: such a record
        # would fail later, at the seed, in the tokenizer or in the store, and with it the run.
        if value is not None and not _encodable(value):
            raise RecordError(f"{where}: the {what} is not valid Unicode (a lone surrogate)")
    return PromptItem(text, category)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_format(path: str | Path, default: str = "json") -> str:
    """`jsonl`, `json` or `csv` from the file name, ignoring `.gz` and rotation suffixes."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    name = _ROTATION.sub("", name)
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    return default


@contextmanager
def open_binary(path: str | Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed when it is gzip (told by its magic number, not its name,
    since logrotate names vary)."""
    with open(path, "rb") as raw:
        if raw.peek(2)[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield unzipped
        else:
            yield raw


# A gzip member cut short raises EOFError; corrupt data zlib.error or BadGzipFile.
_COMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _compression_error(where: str, exc: BaseException) -> RecordError:
    if isinstance(exc, EOFError):
        return RecordError(f"{where}: compressed data ends early (file still being written?)", torn=True)
    return RecordError(f"{where}: corrupt compressed data ({exc})")


def iter_records(path: str | Path, *, text_field: str | None = None, category_field: str | None = None,
                 default_format: str = "json") -> Iterator[PromptItem | RecordError]:
    """Stream the prompts of one file, a `RecordError` in place of each bad record.

    The format comes from the name (`file_format`); OSError from opening or reading propagates.
    An error that leaves the rest of the file unreadable (a bad header, a broken CSV or gzip
    stream, an unparseable JSON list) is yielded last.
    """
    path = Path(path)
    fields = {"text_field": text_field, "category_field": category_field}
    fmt = file_format(path, default_format)
    with open_binary(path) as stream:
        if fmt == "jsonl":
            yield from _jsonl(stream, str(path), fields)
        elif fmt == "csv":
            yield from _csv(stream, str(path), fields)
        else:
            yield from _json_list(stream, str(path), fields)


def _jsonl(stream: BinaryIO, where: str, fields: dict) -> Iterator[PromptItem | RecordError]:
    # Bytes, split on b"\n" only: a text-mode reader would also break lines at U+2028 and other
    # characters JSON strings may hold raw, and one bad byte would end the whole file.
    number = 0
    try:
        while True:
            # At most one line of MAX_PROMPT_LINE_BYTES at a time: a file without newlines
            # (/dev/zero, a binary blob) must not be read whole into one "line".
            raw = stream.readline(MAX_PROMPT_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if len(raw) > MAX_PROMPT_LINE_BYTES:
                yield RecordError(f"{where}:{number}: a line longer than {size_text(MAX_PROMPT_LINE_BYTES)}, the most "
                                  "tailmon reads of one prompt record; the rest of the file is unread")
                return
            torn = not raw.endswith(b"\n")
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            at = f"{where}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RecordError(f"{at}: not UTF-8 text ({exc.reason})", torn=torn)
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RecordError(f"{at}: not valid JSON ({exc.msg})", torn=torn)
                continue
            except RecursionError:  # the user's file, not a bug: arrays nested thousands deep
                yield RecordError(f"{at}: JSON nested too deeply to be a prompt record")
                continue
            try:
                item = parse_record(value, at, **fields)
            except RecordError as exc:
                yield exc
                continue
            yield item
    except _COMPRESSION_ERRORS as exc:
        yield _compression_error(f"{where}:{number + 1}", exc)


def _csv(stream: BinaryIO, where: str, fields: dict) -> Iterator[PromptItem | RecordError]:
    # newline="" as the csv module requires: a quoted field's own \r\n stays as it was.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(_bounded_lines(text))
    text_field, category_field = fields["text_field"], fields["category_field"]
    try:
        columns = reader.fieldnames or []
        if text_field is None:
            field = next((f for f in TEXT_FIELDS if f in columns), None)
            if field is None:
                yield RecordError(f"{where}: a CSV needs a 'prompt' or 'goal' column, found {', '.join(columns) or 'none'}")
                return
        elif text_field in columns:
            field = text_field
        else:
            yield RecordError(f"{where}: no column '{text_field}' in the CSV header (found {', '.join(columns) or 'none'})")
            return
        if category_field is not None and category_field not in columns:
            yield RecordError(f"{where}: no column '{category_field}' in the CSV header (found {', '.join(columns)})")
            return
        category = category_field or "category"
        for row in reader:
            # Short rows give None for their missing cells: treat them as absent.
            record = {k: v for k, v in row.items() if k in (field, category) and v is not None}
            try:
                item = parse_record(record, f"{where}:{reader.line_num}", text_field=text_field, category_field=category)
            except RecordError as exc:
                yield exc
                continue
            yield item
    except UnicodeDecodeError as exc:
        yield RecordError(f"{where}:{reader.line_num + 1}: not UTF-8 text ({exc.reason}); the rest of the file is unread")
    except csv.Error as exc:
        yield RecordError(f"{where}:{reader.line_num}: malformed CSV ({exc}); the rest of the file is unread")
    except _LineTooLong:
        yield RecordError(f"{where}:{reader.line_num + 1}: a line longer than {size_text(MAX_PROMPT_LINE_BYTES)}, the "
                          "most tailmon reads of one prompt record; the rest of the file is unread")
    except _COMPRESSION_ERRORS as exc:
        yield _compression_error(f"{where}:{reader.line_num + 1}", exc)
    finally:
        text.detach()  # the caller's `with` closes the stream


class _LineTooLong(Exception):
    pass


def _bounded_lines(text: io.TextIOWrapper) -> Iterator[str]:
    # The csv module takes lines from an iterator, and a text file's own iterator reads a whole
    # line whatever its length (a file without newlines would be read whole): cap each one.
    while True:
        line = text.readline(MAX_PROMPT_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_PROMPT_LINE_BYTES:
            raise _LineTooLong()
        yield line


def _json_list(stream: BinaryIO, where: str, fields: dict) -> Iterator[PromptItem | RecordError]:
    # A JSON list is parsed whole (the standard library has no streaming parser): JSONL is the
    # format for files larger than memory.
    try:
        raw = read_limited(stream, MAX_JSON_PROMPTS_BYTES, f"{where} (a JSON list, read whole; JSONL streams)")
    except InputError as exc:
        yield RecordError(str(exc))
        return
    except _COMPRESSION_ERRORS as exc:
        yield _compression_error(where, exc)
        return
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        yield RecordError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return
    except json.JSONDecodeError as exc:
        yield RecordError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); use .jsonl or .csv for other formats")
        return
    except RecursionError:  # the user's file, not a bug: arrays nested thousands deep
        yield RecordError(f"{where}: JSON nested too deeply to be a list of prompts")
        return
    if not isinstance(data, list):
        yield RecordError(f"{where}: expected a JSON list of prompts")
        return
    for i, value in enumerate(data):
        try:
            item = parse_record(value, f"{where}: item {i}", **fields)
        except RecordError as exc:
            yield exc
            continue
        yield item


def load_prompts(path: str | Path) -> list[PromptItem]:
    """Every prompt of a file; InputError (one line) at the first bad record or an empty file."""
    path = Path(path)
    items = []
    try:
        for record in iter_records(path):
            if isinstance(record, RecordError):
                raise record
            items.append(record)
    except OSError as exc:
        raise InputError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    if not items:
        raise InputError(f"{path}: no prompts")
    return items
