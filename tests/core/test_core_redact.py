"""Redaction: what it must find (each case a miss reported against the earlier patterns) and what
it must leave alone."""

from __future__ import annotations

import pytest

from tailmon.redact import redact


@pytest.mark.parametrize("text, expected", [
    # found before
    ("mail john.doe+x@example.co.uk now", "mail [EMAIL] now"),
    ("call +44 20 7946 0958 or (555) 123-4567", "call [PHONE] or [PHONE]"),
    # missed before: non-ASCII addresses, or only their ASCII tail ('jö[EMAIL]')
    ("write to john@exämple.de", "write to [EMAIL]"),
    ("write to jöhn@example.com", "write to [EMAIL]"),
    ("почта иван@пример.рф", "почта [EMAIL]"),
    # missed before: zero-width characters inside an address or a number
    ("john\u200b@example.com", "[EMAIL]"),
    ("jo\u200dhn@exa\u2060mple.com", "[EMAIL]"),
    ("555\u200b123\u200b4567", "[PHONE]"),
    # missed before: no-break hyphens, dashes and no-break spaces between digits
    ("555\u2011123\u20114567", "[PHONE]"),
    ("+1\u00a0555\u00a0123\u00a04567", "[PHONE]"),
    ("555\u2013123\u20134567", "[PHONE]"),
    # IP addresses were '[PHONE]'
    ("from 192.168.100.200 and 10.0.0.1", "from [IP] and [IP]"),
    ("host 2001:0db8:85a3:0000:0000:8a2e:0370:7334 or fe80::1", "host [IP] or [IP]"),
])
def test_personal_data_is_found(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "the meeting is at 12:30:45 on 2026-12-07",
    "version 1.2.3 costs $1,299.99 in 2026",
    "use std::vector and a::b in C++",
    "about 1,000,000 queries a day, 12/07/2026",
    "a normal sentence with no data at all",
    "MAC 00:1a:2b:3c:4d:5e is a device, not a person",
])
def test_other_text_is_left_alone(text):
    assert redact(text) == text
