"""Every SQL statement the Nylas package runs, named."""

from __future__ import annotations

from typing import LiteralString

__all__ = ["PACING_ACQUIRE"]

#: Reserve one call on each pacing bucket and return the ms to wait for it (more than max_wait: nothing reserved).
PACING_ACQUIRE: LiteralString = (
    "select nylas_pacing_acquire(%(keys)s::text[], %(intervals_ms)s::float8[], %(tolerances_ms)s::float8[],"
    " %(max_wait_ms)s::int)"
)
