"""Integers a user typed (an image index, a head, a class): ASCII digits with an optional sign.

`str.isdigit` accepts characters `int` refuses ("²") and `int` accepts some that nobody types
as an index ("١", "1_000", " 3 "); every reader parses such text with this one rule, so a bad
value is a clear message, never a traceback.
"""

from __future__ import annotations

import re

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an int64 array (labels, indices) holds

_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_int(text: str) -> int | None:
    """The integer `text` spells in ASCII digits (optional sign), else None."""
    return int(text) if _INTEGER.fullmatch(text) else None
