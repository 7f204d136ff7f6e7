"""Redaction of personal data in everything tailmon stores or exports.

Production prompts carry e-mail addresses, phone numbers and IP addresses. The model always sees
a prompt exactly as production served it (redacting first would change the estimand); the store,
reports and logs only ever see `redact(text)`.

What it finds: e-mail addresses in any script (`jöhn@exämple.de`), also when invisible
characters are slipped inside them; phone numbers whose digits are separated by spaces (also
no-break spaces), dots or any dash (hyphen, no-break hyphen, en and em dash, minus); IPv4 and IPv6
addresses (which the phone pattern took for numbers). Zero-width characters are removed from the
redacted text: they are invisible, and inside an address they would hide it from the patterns.
"""

from __future__ import annotations

import logging
import re

# Zero-width space, non-joiner, joiner, word joiner, soft hyphen, BOM: nothing a reader sees.
INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\u00ad\ufeff]")
# \w is Unicode-aware: local parts and domain labels in any script (internationalised e-mail).
EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])")
# IPv6: the full form (eight groups) or a compressed one (with '::'); times such as 12:30:45
# have neither.
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
                  r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:)*[0-9A-Fa-f]{1,4}::(?:[0-9A-Fa-f]{1,4}:)*[0-9A-Fa-f]{1,4}(?![\w:])")
# Separators between a phone number's digits: whitespace (no-break spaces included), dots and
# every dash (hyphen-minus, hyphen, no-break hyphen, figure/en/em dash, minus sign).
_SEP = "[\\s.\\-\u2010\u2011\u2012\u2013\u2014\u2212]"
# International (+44 20 7946 0958), North American ((555) 123-4567, 555.123.4567) and plain
# digit runs with separators. At least 7 digits, so years, prices and counts stay untouched.
PHONE = re.compile(rf"(?<![\w+])(?:\+\d{{1,3}}{_SEP}?)?(?:\(\d{{1,4}}\){_SEP}?)?\d(?:{_SEP}?\d){{6,14}}(?!\w)")

# Dates look like digit runs with separators; they are not personal data and stay.
DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")

EMAIL_MARK = "[EMAIL]"
PHONE_MARK = "[PHONE]"
IP_MARK = "[IP]"


def _ipv6(match: re.Match) -> str:
    # A compressed form needs a group of 3-4 hex digits (fe80::1), so that code like a::b stays.
    if "::" in match[0] and not any(len(g) >= 3 for g in match[0].split(":")):
        return match[0]
    return IP_MARK


def redact(text: str) -> str:
    """`text` with e-mail addresses, IP addresses and phone numbers replaced by [EMAIL], [IP] and
    [PHONE], and zero-width characters removed."""
    text = INVISIBLE.sub("", text)
    text = EMAIL.sub(EMAIL_MARK, text)
    text = IPV4.sub(IP_MARK, text)
    text = IPV6.sub(_ipv6, text)
    return PHONE.sub(lambda m: m[0] if DATE.fullmatch(m[0]) else PHONE_MARK, text)


# --- Credentials ------------------------------------------------------------------------------
#
# Personal data above is what production sends; credentials are what the operator configures:
# database and endpoint URLs with a password, tokens in query strings, webhook URLs that are
# themselves the secret. Everything tailmon stores, logs or prints passes its URLs through
# mask_url() and its free text through mask_secrets(): one place that knows what a credential
# looks like.

MASK = "***"
"""What a password or a secret query value becomes."""
REDACTED_PATH = "[REDACTED]"
"""What the path and query of a URL that is itself the secret (a webhook's) become."""

# Query (and fragment) parameters that carry a credential, compared case-insensitively with '-'
# read as '_': token=, key=, api_key=, password=, secret=, sig=, signature=, access_token= ...
SECRET_PARAMS = frozenset({
    "token", "key", "apikey", "api_key", "password", "passwd", "pwd", "pass", "secret", "client_secret", "sig",
    "signature", "access_token", "refresh_token", "id_token", "auth", "authorization", "credential",
    "credentials", "x_api_key", "private_token", "session", "sessionid",
})
# ... and any name ending like one (x-amz-signature, x-goog-credential, gitlab's private-token).
_SECRET_SUFFIXES = ("_token", "_key", "_secret", "_password", "_signature", "_sig", "_credential")

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_PARAM = re.compile(r"(?P<lead>^|[&;?#])(?P<name>[^=&;#?]+)=(?P<value>[^&;#]*)")
# user:password@ where no URL parser got to it (an unparseable URL, text around '://').
_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")
# name=value pairs of free text (a libpq conninfo, a driver's message): `password=...`, `token=...`.
_PAIR = re.compile(r"(?<![\w-])(?P<name>[A-Za-z][\w-]*)(?P<eq>\s*=\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s&;,'\"]+)")


def secret_param(name: str) -> bool:
    """Whether a query parameter (or key=value pair) of this name carries a credential."""
    norm = name.strip().lower().replace("-", "_")
    return norm in SECRET_PARAMS or norm.endswith(_SECRET_SUFFIXES)


def _mask_params(text: str) -> str:
    return _PARAM.sub(lambda m: f"{m['lead']}{m['name']}={MASK}" if secret_param(m["name"]) and m["value"]
                      else m[0], text)


def mask_url(url: str, whole: bool = False, strict: bool = False) -> str:
    """`url` without its credentials: the password of its user info and the values of secret query
    and fragment parameters become ***. `whole`: the URL is itself the secret (a Slack-style
    webhook): only scheme://host[:port] stays, the rest becomes /[REDACTED]. `strict` (the HTTP
    clients' errors, tailmon.httpclient): all of the user info and every query value become ***,
    the fragment goes."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host
        parts = None
    if parts is None or not parts.scheme or not parts.netloc:
        # No host to keep apart (sqlite:////path, or not a URL): mask what looks like a credential.
        head, q, query = _USERINFO.sub(rf"\1{MASK}@", url).partition("?")
        return head + q + _mask_params(query)
    host = parts.netloc.rpartition("@")[2]
    if whole:
        rest = parts.path not in ("", "/") or parts.query or parts.fragment
        return f"{parts.scheme}://{host}" + (f"/{REDACTED_PATH}" if rest else "")
    netloc = parts.netloc
    if strict:
        netloc = f"{MASK}@{host}" if "@" in netloc else netloc
        query = "&".join(f"{p.partition('=')[0]}={MASK}" if "=" in p else p for p in parts.query.split("&"))
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if parts.query else "")
    if "@" in netloc:
        user, colon, _ = netloc.rpartition("@")[0].partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else netloc
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query or url.endswith("?"):
        out += "?" + _mask_params(parts.query)
    if parts.fragment:
        out += "#" + _mask_params(parts.fragment)
    return out


def _masked_url_in_text(match: re.Match) -> str:
    # Punctuation after a URL in prose ("failed at http://h/x?token=t, retrying") is not part of it.
    url = match[0].rstrip(".,;:!?)]}")
    return mask_url(url) + match[0][len(url):]


def mask_secrets(text: str, pairs: bool = True) -> str:
    """`text` with the credentials of every URL in it masked (mask_url), and with `pairs` the
    values of `password=...`-like pairs outside URLs too (a driver's conninfo in an error; not
    in settings, where `regex:token=\\w+` is a judge, not a token)."""
    if not isinstance(text, str):
        return text
    text = _URL.sub(_masked_url_in_text, text)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    if not pairs:
        return text
    return _PAIR.sub(lambda m: f"{m['name']}{m['eq']}{MASK}"
                     if secret_param(m["name"]) and m["value"].strip("'\"") not in ("", MASK) else m[0], text)


def mask_settings(value):
    """A copy of a settings structure (dicts, lists, strings) with the credentials of every URL
    in its strings masked: a monitor's settings, a report, as they may be stored and printed."""
    if isinstance(value, dict):
        return {k: mask_settings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_settings(v) for v in value]
    return mask_secrets(value, pairs=False) if isinstance(value, str) else value


class SecretsFilter(logging.Filter):
    """A log handler's filter: every record's message through mask_secrets(), whoever logged it
    (a driver's error quoting its URL, an exception's text). Installed by the CLI's logging."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call: the handler reports it as it always does
            return True
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:  # a traceback quotes messages too
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True
