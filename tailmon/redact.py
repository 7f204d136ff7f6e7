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
