"""Credentials in URLs and text (issue 18, item 2): what `mask_url` and `mask_secrets` must hide,
what they must leave readable, and the log filter that applies them to every log line."""

from __future__ import annotations

import logging

import pytest

from tailmon.redact import SecretsFilter, mask_secrets, mask_settings, mask_url


@pytest.mark.parametrize("url, expected", [
    # user info: the password goes, the user name stays (it says who connects)
    ("postgresql://tailmon:hunter2@db:5432/tailmon", "postgresql://tailmon:***@db:5432/tailmon"),
    ("postgresql+psycopg://u:p%40ss@db/x", "postgresql+psycopg://u:***@db/x"),
    ("https://ops:pw@[2001:db8::1]:8443/v1", "https://ops:***@[2001:db8::1]:8443/v1"),
    # the known secret query parameters, whatever their case or dashes; others stay
    ("postgresql://u@db/x?password=hunter2&sslmode=require", "postgresql://u@db/x?password=***&sslmode=require"),
    ("https://h/v1?token=t1&key=k1&api_key=a1&secret=s1", "https://h/v1?token=***&key=***&api_key=***&secret=***"),
    ("https://h/x?sig=a&signature=b&access_token=c&page=2", "https://h/x?sig=***&signature=***&access_token=***&page=2"),
    ("https://s3/b/o?X-Amz-Signature=abc&X-Amz-Date=20261207", "https://s3/b/o?X-Amz-Signature=***&X-Amz-Date=20261207"),
    ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=***&state=1"),
    # without a host (SQLite paths) or not parseable: still no password
    ("sqlite:////var/lib/tailmon/tailmon.db", "sqlite:////var/lib/tailmon/tailmon.db"),
    ("sqlite:///x.db?password=a", "sqlite:///x.db?password=***"),
    ("garbage://u:hunter2@host", "garbage://u:***@host"),
    ("http://[bad/x?token=1", "http://[bad/x?token=***"),
    # nothing to hide
    ("https://hooks.example.com/tailmon", "https://hooks.example.com/tailmon"),
    ("postgresql://u@db/x", "postgresql://u@db/x"),
])
def test_mask_url(url, expected):
    """Catches a credential left in a URL that tailmon stores or prints, and a mask that eats the
    parts an operator needs to tell which server it is."""
    assert mask_url(url) == expected


def test_a_webhook_url_is_masked_whole():
    """Catches a Slack-style webhook (the path is the secret) shown with its path."""
    assert mask_url("https://hooks.slack.com/services/T000/B000/XXXXSECRET", whole=True) == \
        "https://hooks.slack.com/[REDACTED]"
    assert mask_url("http://u:pw@127.0.0.1:8080/hook?x=1", whole=True) == "http://127.0.0.1:8080/[REDACTED]"
    assert mask_url("https://hooks.example.com", whole=True) == "https://hooks.example.com"


def test_mask_secrets_in_text():
    """Catches credentials quoted by an error message or a log line: URLs among prose (keeping
    the punctuation around them) and libpq-style key=value pairs."""
    text = ("judge endpoint https://h/v1?api_key=qskey, then (postgresql://u:dbpw@db/x). "
            "conninfo host=db password=connpw user=u; token = 'tok' and keyring=fine")
    assert mask_secrets(text) == (
        "judge endpoint https://h/v1?api_key=***, then (postgresql://u:***@db/x). "
        "conninfo host=db password=*** user=u; token = *** and keyring=fine")
    assert mask_secrets("nothing secret at http://h/x?page=2.") == "nothing secret at http://h/x?page=2."
    assert mask_secrets(None) is None


def test_mask_settings_walks_the_structure():
    settings = {"prompts": {"type": "sql", "url": "postgresql://r:pw1@db/logs"},
                "model": {"base_urls": ["http://a:pw2@gpu1:8000"], "temperature": 1.0},
                "judge": "endpoint:https://guard/v1?key=pw3@guard-model", "n": 3, "x": None}
    masked = mask_settings(settings)
    # A query value runs to the next '&' or '#' ('@' is allowed in a query): the endpoint judge's
    # @MODEL after a secret goes with it, never part of the secret with the model.
    assert masked == {"prompts": {"type": "sql", "url": "postgresql://r:***@db/logs"},
                      "model": {"base_urls": ["http://a:***@gpu1:8000"], "temperature": 1.0},
                      "judge": "endpoint:https://guard/v1?key=***", "n": 3, "x": None}
    assert settings["prompts"]["url"] == "postgresql://r:pw1@db/logs"  # a copy: the config is untouched
    # Outside URLs a setting is left as written: this judge looks for leaked keys, it holds none.
    assert mask_settings({"judge": r"regex:api_key=\w{20,}"}) == {"judge": r"regex:api_key=\w{20,}"}


def test_the_log_filter_masks_messages_arguments_and_tracebacks():
    """Catches a log line (or its traceback) that quotes a credential, whoever logged it."""
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "cannot reach %s: %s", (
        "postgresql://u:dbpw@db/x", "password=connpw"), None)
    try:
        raise RuntimeError("failed at https://h/v1?token=tracetok")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    assert SecretsFilter().filter(record) is True
    formatted = logging.Formatter().format(record)
    assert "dbpw" not in formatted and "connpw" not in formatted and "tracetok" not in formatted
    assert "cannot reach postgresql://u:***@db/x: password=***" in formatted
    assert "RuntimeError: failed at https://h/v1?token=***" in formatted
