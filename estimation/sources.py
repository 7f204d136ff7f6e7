"""Prompt sources for the daemon, and the random draw of a run's m prompts from one.

A source streams `PromptItem`s from a prompt file (`file`), a directory of rotated log files
(`logs`) or a SQL query (`sql`); `sample_prompts` draws m of them in one pass whatever the size.
Texts are returned exactly as production served them: redaction of personal data happens where
prompts are stored or exported (`tailmon.redact`), never before the model sees them.

Errors. A source that cannot deliver prompts at run time raises `SourceError`, a
`RuntimeFailure` (exit 3): a missing or unreadable file or directory, a database that cannot be
reached or a query that fails, and `NoPromptsError` when nothing is left after the filters. The
same configuration may well work on the next run (the log rotates, traffic comes back), so the
daemon records a failed run and keeps its schedule. Content that contradicts the configuration is
the user's to fix and raises `InputError` (exit 2): a bad record in a `file` source (named by file
and line, as `tailmon estimate` reports it), a log file in which nothing parses, a configured
column that the CSV header or the query result lacks. Configuration itself is checked by
`SourceConfig` (pydantic's ValidationError, which the config loader reports).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import sqlite3
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePath
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tailmon.errors import InputError, RuntimeFailure
from tailmon.estimation.prompts import PromptItem, RecordError, iter_records
from tailmon.redact import mask_secrets, mask_url

log = logging.getLogger(__name__)

# Which keys belong to which source type (the others are shared), and which each type needs.
TYPE_KEYS = {"file": ("path",), "logs": ("directory", "glob", "max_files"), "sql": ("url", "query")}
REQUIRED_KEYS = {"file": ("path",), "logs": ("directory",), "sql": ("url", "query")}


class SourceError(RuntimeFailure):
    """A prompt source failed at run time (missing file, unreachable database, ...): exit 3."""


class NoPromptsError(SourceError):
    """A source had no record left after the length filters (and deduplication)."""


class SourceConfig(BaseModel):
    """A monitor's `prompts:` section."""

    # Input values stay out of error messages: `url` carries a password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, frozen=True, use_attribute_docstrings=True)

    type: Literal["file", "logs", "sql"]
    """`file`: one prompt file; `logs`: a directory of rotated log files; `sql`: a database query."""
    path: Path | None = None
    """file: a .jsonl, .json or .csv file, each optionally gzipped; relative to the config file."""
    directory: Path | None = None
    """logs: the directory of log files; relative to the config file."""
    glob: str = Field("*.jsonl*", min_length=1)
    """logs: which files of the directory to read (pathlib glob, `**` recurses)."""
    max_files: int | None = Field(None, ge=1)
    """logs: read only the newest N matching files (by modification time); None reads all."""
    url: str | None = Field(None, repr=False)
    """sql: SQLAlchemy database URL (dialect+driver://user:password@host/database)."""
    query: str | None = Field(None, min_length=1)
    """sql: the query returning one row per served prompt."""
    text_field: str | None = Field(None, min_length=1)
    """Field, column or dotted path (request.prompt) of the prompt text. Default: the first of
    prompt / instruction / goal present; for sql the first column."""
    category_field: str | None = Field(None, min_length=1)
    """Field or column of the category. Default `category` where present; a record without one
    has category None. A configured CSV or SQL column must exist."""
    per_run: int = Field(20, ge=1)
    """Prompts drawn per run."""
    dedupe: bool = False
    """Draw distinct texts uniformly instead of served records: changes the estimand from the
    traffic-weighted mean to the mean over distinct prompts."""
    min_chars: int = Field(1, ge=0)
    """Records with fewer characters are not drawn."""
    max_chars: int | None = Field(8000, ge=1)
    """Records with more characters are not drawn; None: no upper limit."""
    stratify: bool = True
    """Allocate the draw across categories in proportion to their sizes."""

    @field_validator("glob")
    @classmethod
    def _relative_glob(cls, value: str) -> str:
        if PurePath(value).is_absolute():
            raise ValueError(f"glob must be a pattern relative to directory, got {value!r}")
        return value

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("query is blank")
        return value

    @field_validator("url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except (ArgumentError, ValueError):
            # The value itself is never echoed: it may hold a password.
            raise ValueError("url is not a database URL of the form dialect+driver://user:password@host/database") from None
        return value

    @model_validator(mode="after")
    def _keys_of_the_type(self) -> SourceConfig:
        foreign = [key for other, keys in TYPE_KEYS.items() if other != self.type
                   for key in keys if key in self.model_fields_set]
        if foreign:
            owners = sorted({other for other, keys in TYPE_KEYS.items() for key in foreign if key in keys})
            raise ValueError(f"type '{self.type}' does not take {', '.join(repr(k) for k in foreign)} "
                             f"(keys of type {' and '.join(repr(o) for o in owners)})")
        missing = [key for key in REQUIRED_KEYS[self.type] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"type '{self.type}' needs {' and '.join(repr(k) for k in missing)}")
        if self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        return self


@dataclass
class PassStats:
    """What the latest pass over a source read: records yielded, bad records skipped, files."""

    records: int = 0
    skipped: int = 0
    files: int = 0


class PromptSource(ABC):
    """A stream of served prompts. Each call of `records()` is a new pass (one per run) and resets
    `stats`."""

    stats: PassStats

    def __init__(self) -> None:
        self.stats = PassStats()

    @abstractmethod
    def records(self) -> Iterator[PromptItem]:
        """The source's prompts in a stable order, streamed (never all in memory at once)."""

    @abstractmethod
    def describe(self) -> str:
        """One line naming the source for logs and reports, without secrets."""


class FileSource(PromptSource):
    """One prompt file. JSONL and CSV stream a line at a time; a JSON list is read whole, so a
    large file should be JSONL. A bad record is an InputError naming file and line."""

    def __init__(self, path: Path, *, text_field: str | None = None, category_field: str | None = None):
        super().__init__()
        self.path = path
        self.text_field = text_field
        self.category_field = category_field

    def describe(self) -> str:
        return f"file {self.path}"

    def records(self) -> Iterator[PromptItem]:
        stats = self.stats = PassStats()
        try:
            for record in iter_records(self.path, text_field=self.text_field, category_field=self.category_field):
                if isinstance(record, RecordError):
                    raise record
                stats.records += 1
                yield record
        except FileNotFoundError:
            raise SourceError(f"prompts file {self.path} does not exist") from None
        except OSError as exc:
            raise SourceError(f"cannot read prompts file {self.path}: {exc.strerror or exc}") from None
        stats.files = 1


class LogDirectorySource(PromptSource):
    """The files matching `glob` in a directory, newest first by modification time.

    Log files are read leniently: a line that does not parse (a torn last line, a record without
    the text field) is skipped, counted in `stats.skipped` and logged as a warning per file. A
    file with bad records and not one good one is an InputError: the glob or the field names do
    not fit it. Files named .csv or .json (before rotation and .gz suffixes) are read as such, a
    JSON list whole; anything else is read as JSONL.
    """

    def __init__(self, directory: Path, glob: str = "*.jsonl*", max_files: int | None = None, *,
                 text_field: str | None = None, category_field: str | None = None):
        super().__init__()
        self.directory = directory
        self.glob = glob
        self.max_files = max_files
        self.text_field = text_field
        self.category_field = category_field

    def describe(self) -> str:
        newest = f" (newest {self.max_files})" if self.max_files else ""
        return f"logs {self.directory / self.glob}{newest}"

    def files(self) -> list[Path]:
        """The files a pass reads, newest first; SourceError when there are none."""
        if not self.directory.is_dir():
            raise SourceError(f"logs directory {self.directory} does not exist or is not a directory")
        found = []
        try:
            for path in self.directory.glob(self.glob):
                try:
                    info = path.stat()
                except FileNotFoundError:  # rotated away since the listing
                    continue
                if stat.S_ISREG(info.st_mode):
                    found.append((-info.st_mtime_ns, str(path), path))
        except OSError as exc:
            raise SourceError(f"cannot list logs directory {self.directory}: {exc.strerror or exc}") from None
        if not found:
            raise SourceError(f"no files match {self.glob!r} in logs directory {self.directory}")
        found.sort()
        return [path for _, _, path in found][: self.max_files]

    def records(self) -> Iterator[PromptItem]:
        stats = self.stats = PassStats()
        for path in self.files():
            good = bad = hard = 0
            first: RecordError | None = None
            try:
                for record in iter_records(path, text_field=self.text_field, category_field=self.category_field,
                                           default_format="jsonl"):
                    if isinstance(record, RecordError):
                        bad += 1
                        hard += not record.torn
                        first = first or record
                        continue
                    good += 1
                    stats.records += 1
                    yield record
            except FileNotFoundError:
                # Rotated or deleted between the listing and the open: its records now live
                # under another name or nowhere; the pass goes on with the files still there.
                log.warning("log file %s disappeared before it could be read", path)
                continue
            except OSError as exc:
                raise SourceError(f"cannot read log file {path}: {exc.strerror or exc}") from None
            stats.files += 1
            stats.skipped += bad
            if hard and not good:
                raise InputError(f"nothing parses in log file {path}: {bad} bad record(s), the first: {first}")
            if bad:
                log.warning("skipped %d malformed record(s) in %s; the first: %s", bad, path, first)


class SqlSource(PromptSource):
    """The rows of a query, streamed in batches (server-side cursors where the driver has them).

    The text is the `text_field` column (default: the first); rows whose text is NULL, blank or
    not a string are skipped and counted. Connections are not pooled between runs. A relative
    SQLite path resolves against `base_dir`. Drivers wait as long as they are configured to: put
    a timeout in the URL where the driver takes one (`?connect_timeout=10` for PostgreSQL).
    """

    def __init__(self, url: str, query: str, *, text_field: str | None = None, category_field: str | None = None,
                 base_dir: Path | None = None, batch_size: int = 1000):
        super().__init__()
        import sqlalchemy
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        from sqlalchemy.pool import NullPool

        parsed = make_url(url)
        if (parsed.drivername.startswith("sqlite") and base_dir is not None and parsed.database
                and parsed.database != ":memory:" and not parsed.database.startswith("file:")
                and not Path(parsed.database).is_absolute()):
            parsed = parsed.set(database=str(base_dir / parsed.database))
        self.url = parsed
        self.query = query
        self.text_field = text_field
        self.category_field = category_field
        self.batch_size = batch_size
        try:
            self._engine = sqlalchemy.create_engine(_read_only(parsed), poolclass=NullPool,
                                                    connect_args=_read_only_connect_args(parsed))
        except (ArgumentError, ImportError, TypeError, ValueError) as exc:  # unknown dialect, missing driver, bad option
            raise InputError(f"cannot use database URL {self.describe_url()}: {_first_line(exc)}") from None

    def describe_url(self) -> str:
        # mask_url: the password of the user info and of the query (`?password=`), other secrets too.
        return mask_url(self.url.render_as_string(hide_password=False))

    def describe(self) -> str:
        return f"sql {self.describe_url()}"

    def _scrub(self, message: str) -> str:
        # A driver may quote the password bare (not in a URL): the user info's and the query's.
        for password in (self.url.password, self.url.query.get("password")):
            if password and isinstance(password, str):
                message = message.replace(password, "***")
        return mask_secrets(message)

    def records(self) -> Iterator[PromptItem]:
        import sqlalchemy
        from sqlalchemy.exc import SQLAlchemyError

        stats = self.stats = PassStats()
        bad = 0
        try:
            connection = self._engine.connect()
        except SQLAlchemyError as exc:
            raise SourceError(self._scrub(f"{self.describe()}: cannot connect: {_first_line(exc)}")) from None
        with connection:
            try:
                driver = connection.connection.driver_connection
                if isinstance(driver, sqlite3.Connection):
                    driver.set_authorizer(_select_only)
                options = {"stream_results": True, "yield_per": self.batch_size}
                if self.url.get_backend_name() == "postgresql":
                    options["postgresql_readonly"] = True  # this transaction: SET TRANSACTION READ ONLY
                result = connection.execution_options(**options).execute(sqlalchemy.text(self.query))
                columns = list(result.keys())
                text_index, category_index = self._columns(columns)
                for row in result:
                    text = row[text_index]
                    if not isinstance(text, str) or not text.strip():
                        bad += 1
                        continue
                    category = None if category_index is None else row[category_index]
                    stats.records += 1
                    yield PromptItem(text, None if category is None else str(category))
            except SQLAlchemyError as exc:
                raise SourceError(self._scrub(f"{self.describe()}: the query failed: {_first_line(exc)}")) from None
        stats.skipped = bad
        if bad and not stats.records:
            raise InputError(f"{self.describe()}: column {columns[text_index]!r} holds no prompt text in any of the "
                             f"{bad} rows (NULL, blank or not a string)")
        if bad:
            log.warning("%s: skipped %d row(s) whose text is NULL, blank or not a string", self.describe(), bad)

    def _columns(self, columns: list[str]) -> tuple[int, int | None]:
        if not columns:
            raise InputError(f"{self.describe()}: the query returns no columns")
        if self.text_field is None:
            text_index = 0
        elif self.text_field in columns:
            text_index = columns.index(self.text_field)
        else:
            raise InputError(f"{self.describe()}: text_field {self.text_field!r} is not a column of the query "
                             f"(columns: {', '.join(columns)})")
        if self.category_field is not None and self.category_field not in columns:
            raise InputError(f"{self.describe()}: category_field {self.category_field!r} is not a column of the query "
                             f"(columns: {', '.join(columns)})")
        name = self.category_field or "category"
        category_index = columns.index(name) if name in columns and columns.index(name) != text_index else None
        return text_index, category_index


# The SQL source reads production logs: the query is run read-only, so that a mistake (or a
# hostile config) cannot change or create anything. SQLite: the file is opened with mode=ro and
# an authorizer allows reading statements only (mode=ro alone still lets ATTACH create files);
# PostgreSQL: the session's transactions default to read-only and the query's own transaction is
# READ ONLY. A role that may only SELECT is still the database's own guarantee: give tailmon one.
_SQLITE_READING = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _select_only(action: int, *_args) -> int:
    return sqlite3.SQLITE_OK if action in _SQLITE_READING else sqlite3.SQLITE_DENY


def _read_only(url):
    """The URL opened read-only where the URL can say so (SQLite files: mode=ro)."""
    if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
        return url
    database = url.database if url.database.startswith("file:") else f"file:{url.database}"
    return url.set(database=database).update_query_dict({"mode": "ro", "uri": "true"})


def _read_only_connect_args(url) -> dict:
    if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2"):
        return {"options": "-c default_transaction_read_only=on"}
    return {}


def _first_line(exc: BaseException) -> str:
    # DBAPI errors come wrapped by SQLAlchemy with the statement and a help link: keep the
    # driver's own first line.
    inner = getattr(exc, "orig", None) or exc
    lines = str(inner).strip().splitlines()
    return lines[0] if lines else type(inner).__name__


def build_source(config: SourceConfig, base_dir: Path) -> PromptSource:
    """The source a config describes; relative paths resolve against `base_dir` (the config
    file's folder). Touches no file and opens no connection: that happens in `records()`."""
    base_dir = Path(base_dir)
    fields = {"text_field": config.text_field, "category_field": config.category_field}

    def resolve(path: Path) -> Path:
        return base_dir / path.expanduser()  # an absolute path replaces base_dir

    if config.type == "file":
        return FileSource(resolve(config.path), **fields)
    if config.type == "logs":
        return LogDirectorySource(resolve(config.directory), config.glob, config.max_files, **fields)
    return SqlSource(config.url, config.query, base_dir=base_dir, **fields)


# --- sampling -----------------------------------------------------------------------------------
#
# Bottom-k sampling. Every eligible record gets a key, uniform on [0, 2^64) and a keyed function of
# the seed, and each stratum (a category, or everything when not stratifying) keeps the records
# with the smallest keys in a bounded heap. Keys are independent uniforms, so the k smallest of a
# stratum are a simple random sample of it without replacement, however large the stream: one
# pass, O(m x categories) memory, deterministic per seed.
#
# Without dedupe the key is a function of (seed, position in the stream): every record is a draw,
# so a prompt served twice is twice as likely to be drawn. That is the traffic-weighted mean that
# the per-query harm probability needs. With dedupe the key hashes (seed, text): copies of a text
# share one key and so one place in the heap, which makes the sample uniform over distinct texts
# without a set of all texts. The estimand becomes the mean over distinct prompts, which is why
# dedupe is off by default.
#
# Stratified allocation. Stratum c gets the quota q_c = m N_c / N. Rounding is floor(q_c) plus one
# more with probability frac(q_c), drawn jointly by systematic sampling so that the extras add up
# to exactly m. Counts are thus floor or ceil of the quota, as largest-remainder rounding gives,
# but every record keeps the inclusion probability m/N of the unstratified draw; largest remainder
# would never give a small category its extra draw (with m = 2 and five equal categories, the
# same two categories would always be drawn).
#
# With dedupe, N_c is the number of distinct texts, which one pass in bounded memory cannot count
# exactly. Each stratum keeps m + 1 keys: when its heap never filled, the count is exact; when it
# did, the k-minimum-values estimate (k - 1) / U_(k) (U_(k) the largest kept key scaled to (0, 1],
# k = m + 1) is used, unbiased with a relative error of about 1 / sqrt(m). Quotas that exceed what a
# stratum holds are capped and the rest re-allocated.

_KEY_SPACE = 1 << 64


class _Keys:
    """Keyed 64-bit keys, uniform and independent across inputs for a given seed."""

    def __init__(self, seed: int):
        self._secret = hashlib.blake2b(repr(int(seed)).encode(), digest_size=32).digest()
        self._base = hashlib.blake2b(digest_size=8, key=self._secret)

    def _key(self, data: bytes) -> int:
        h = self._base.copy()
        h.update(data)
        return int.from_bytes(h.digest(), "little")

    def positions(self) -> Iterator[int]:
        """The keys of positions 0, 1, 2, ...: Philox is a counter-based generator (its output is
        a keyed block cipher of the counter), so key i is a keyed function of (seed, i), made in
        blocks about ten times faster than one hash call per record."""
        generator = np.random.Philox(key=int.from_bytes(self._secret[:16], "little"))
        while True:
            yield from generator.random_raw(4096).tolist()

    def text(self, text: str) -> int:
        # surrogatepass: JSON may carry lone surrogates, which strict UTF-8 cannot encode.
        return self._key(b"t" + text.encode("utf-8", "surrogatepass"))

    def uniform(self, label: str) -> Fraction:
        return Fraction(self._key(b"u" + label.encode()), _KEY_SPACE)


class _Stratum:
    __slots__ = ("heap", "members", "records")

    def __init__(self) -> None:
        # Entries (-key, -position, item): heap[0] holds the largest key kept.
        self.heap: list[tuple[int, int, PromptItem]] = []
        self.members: set[tuple[int, str]] = set()  # (key, text) of the kept entries, for dedupe
        self.records = 0

    def offer(self, key: int, position: int, item: PromptItem, capacity: int, dedupe: bool) -> None:
        heap = self.heap
        if len(heap) >= capacity and (-key, -position) <= heap[0][:2]:
            return
        if dedupe:
            if (key, item.text) in self.members:
                return
            self.members.add((key, item.text))
        if len(heap) < capacity:
            heapq.heappush(heap, (-key, -position, item))
        else:
            evicted = heapq.heapreplace(heap, (-key, -position, item))
            if dedupe:
                self.members.discard((-evicted[0], evicted[2].text))

    def smallest(self, k: int) -> list[tuple[int, int, PromptItem]]:
        return sorted(self.heap, reverse=True)[:k]

    def size(self, capacity: int, dedupe: bool) -> Fraction:
        if not dedupe:
            return Fraction(self.records)
        if len(self.heap) < capacity:
            return Fraction(len(self.heap))
        largest = -self.heap[0][0]
        return max(Fraction(capacity), Fraction((capacity - 1) * _KEY_SPACE, largest + 1))


def _category_order(category: str | None) -> tuple[bool, str]:
    return (category is not None, category or "")


def allocate(m: int, sizes: dict, available: dict, u: Fraction) -> dict:
    """Split m draws across strata in proportion to `sizes`, at most `available[c]` each.

    Quotas are rounded to floor or ceil, the extra draws picked by systematic sampling with
    probabilities equal to the fractional parts, from `u` in [0, 1). Requires sum(available) >= m.
    """
    counts: dict = {}
    remaining = sorted(sizes, key=_category_order)
    budget = m
    while True:
        total = sum(sizes[c] for c in remaining)
        quotas = {c: Fraction(budget) * sizes[c] / total if total else Fraction(0) for c in remaining}
        over = [c for c in remaining if quotas[c] > available[c]]
        if not over:
            break
        for c in over:
            counts[c] = available[c]
            budget -= available[c]
        remaining = [c for c in remaining if c not in over]
    cumulative = Fraction(0)
    for c in remaining:
        floor = math.floor(quotas[c])
        start, cumulative = cumulative, cumulative + quotas[c] - floor
        # Exactly one or no point u + j (j integer) falls in [start, cumulative), since the
        # fractional part is below 1; over all strata the points number budget - sum of floors.
        counts[c] = floor + math.ceil(cumulative - u) - math.ceil(start - u)
    return counts


def sample_prompts(source: PromptSource, m: int, seed: int, *, dedupe: bool = False, min_chars: int = 1,
                   max_chars: int | None = None, stratify: bool = True) -> list[PromptItem]:
    """m prompts drawn at random from one pass over `source`, in stream order.

    Records whose text has fewer than `min_chars` or more than `max_chars` characters are not
    eligible. Without `dedupe` each eligible record has probability m/N of being drawn (uniform
    over served records); with it each distinct text has (about, when stratifying) m/D. With
    `stratify`, each category gets floor or ceil of its proportional share (see `allocate`);
    records without a category form a stratum of their own. The same seed gives the same draw
    from the same records. Fewer eligible records than m: all of them. None: NoPromptsError.
    """
    if m < 1:
        raise InputError(f"m must be at least 1, got {m}")
    keys = _Keys(seed)
    # Stratified dedupe keeps one key more per stratum for the distinct-count estimate.
    capacity = m + 1 if dedupe and stratify else m
    strata: dict[str | None, _Stratum] = {}
    records = source.records()
    # Position keys come from a counter-based stream, one per record read (filtered or not).
    stream = zip(records, keys.positions()) if not dedupe else ((item, 0) for item in records)
    read = eligible = 0
    for position, (item, key) in enumerate(stream):
        read += 1
        text = item.text
        length = len(text)
        if length < min_chars or (max_chars is not None and length > max_chars):
            continue
        eligible += 1
        category = item.category if stratify else None
        stratum = strata.get(category)
        if stratum is None:
            stratum = strata[category] = _Stratum()
        stratum.records += 1
        if dedupe:
            key = keys.text(text)
        heap = stratum.heap
        # Most records of a long stream lose to the largest kept key: reject them before a call.
        if len(heap) < capacity or (-key, -position) > heap[0][:2]:
            stratum.offer(key, position, item, capacity, dedupe)

    if not eligible:
        filters = f"min_chars={min_chars}, max_chars={max_chars}" + (", dedupe" if dedupe else "")
        raise NoPromptsError(f"no prompts in {source.describe()} after filters ({filters}): "
                             f"{read} record(s) read, none eligible")
    held = sum(len(s.heap) for s in strata.values())
    if held <= m:
        # Either one stratum, whose heap is the draw, or every record (every distinct text) fits.
        chosen = [entry for s in strata.values() for entry in s.heap]
    elif len(strata) == 1:
        chosen = next(iter(strata.values())).smallest(m)
    else:
        sizes = {c: s.size(capacity, dedupe) for c, s in strata.items()}
        available = {c: len(s.heap) for c, s in strata.items()}
        counts = allocate(m, sizes, available, keys.uniform("allocation"))
        chosen = [entry for c, s in strata.items() for entry in s.smallest(counts[c])]
    chosen.sort(key=lambda entry: -entry[1])
    log.info("drew %d of %d eligible prompt(s) (%d read) from %s", len(chosen), eligible, read, source.describe())
    return [item for _, _, item in chosen]
