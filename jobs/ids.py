"""Resource ids: a type prefix plus a time-sortable random part (``job_01j9...``).

Sorting ids sorts by creation time (to the millisecond), so cursor pagination needs only the id.
"""

from __future__ import annotations

import os
import re
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
PREFIXES = {
    "team": "team",
    "key": "key",
    "forget_set": "fs",
    "model": "mdl",
    "job": "job",
    "webhook_delivery": "msg",
    "dashboard_session": "ses",
}
ID_PATTERN = re.compile(r"^[a-z]{2,4}_[0-9a-hjkmnp-tv-z]{26}$")


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(kind: str) -> str:
    """A new id for ``kind`` (a key of ``PREFIXES``): 10 chars of milliseconds + 16 random chars."""
    millis = int(time.time() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{PREFIXES[kind]}_{_b32(millis, 10)}{_b32(rand, 16)}"


def looks_like(kind: str, value: str) -> bool:
    """Whether ``value`` has the shape of an id of ``kind`` (cheap check before touching the DB)."""
    return isinstance(value, str) and value.startswith(PREFIXES[kind] + "_") and bool(ID_PATTERN.match(value))
