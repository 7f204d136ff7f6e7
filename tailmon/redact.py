"""Redaction of personal data in everything tailmon stores or exports.

Production prompts carry e-mail addresses and phone numbers. The model always sees a prompt
exactly as production served it (redacting first would change the estimand); the store, reports
and logs only ever see `redact(text)`.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# International (+44 20 7946 0958), North American ((555) 123-4567, 555.123.4567) and plain
# digit runs with separators. At least 7 digits, so years, prices and counts stay untouched.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d(?:[\s.-]?\d){6,14}(?!\w)")

# Dates look like digit runs with separators; they are not personal data and stay.
DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")

EMAIL_MARK = "[EMAIL]"
PHONE_MARK = "[PHONE]"


def redact(text: str) -> str:
    """`text` with e-mail addresses and phone numbers replaced by [EMAIL] and [PHONE]."""
    text = EMAIL.sub(EMAIL_MARK, text)
    return PHONE.sub(lambda m: m[0] if DATE.fullmatch(m[0]) else PHONE_MARK, text)
