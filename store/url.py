"""Which database the store uses: URL resolution, validation, and passwords kept out of messages."""

from __future__ import annotations

import os

from sqlalchemy.engine import make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError

from tailmon.errors import InputError
from tailmon.paths import state_dir
from tailmon.redact import mask_secrets, mask_url

DATABASE_URL_ENV = "TAILMON_DATABASE_URL"


def default_database_url() -> str:
    """SQLite file `tailmon.db` in the state directory (TAILMON_STATE_DIR or the user state dir)."""
    # Absolute, so the URL means the same file whatever the daemon's working directory later is.
    return f"sqlite:///{(state_dir() / 'tailmon.db').absolute()}"


def resolve_database_url(configured: str | None) -> str:
    """The configured URL, else TAILMON_DATABASE_URL, else `default_database_url()`."""
    if configured and configured.strip():
        return configured.strip()
    env = os.environ.get(DATABASE_URL_ENV, "").strip()
    return env or default_database_url()


def safe_url(url: str) -> str:
    """`url` with its password (user info, `?password=` and other secret parameters) replaced by
    *** (tailmon.redact.mask_url: the one place that knows what a credential looks like)."""
    return mask_url(url)


def mask_password(url: str, text: str) -> str:
    """`text` without the password of `url` (a driver message might quote it bare) nor any other
    credential (mask_secrets)."""
    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        password = None
    if password:
        text = text.replace(str(password), "***")
    return mask_secrets(text)


def engine_url(url: str) -> URL:
    """Parse and check `url`; PostgreSQL URLs without a driver get psycopg 3, the one we ship."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise InputError(f"database URL '{safe_url(url)}' is not valid: {e}") from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        # Plain postgresql:// would make SQLAlchemy load psycopg2, which tailmon does not depend on.
        if "+" not in parsed.drivername:
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif backend == "postgres":
            parsed = parsed.set(drivername="postgresql+" + parsed.drivername.split("+", 1)[1])
        return parsed
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:" or parsed.query.get("mode") == "memory":
            raise InputError(f"database URL '{safe_url(url)}': in-memory SQLite would lose every run; "
                             "give a file, e.g. sqlite:////var/lib/tailmon/tailmon.db")
        return parsed
    raise InputError(f"database URL '{safe_url(url)}': unsupported database '{backend}' "
                     "(use sqlite:///PATH or postgresql://USER@HOST/DB)")
