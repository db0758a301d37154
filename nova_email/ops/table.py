"""Plain-text tables and the small formats operators read: ages, durations, counts.

The commands print to terminals and to log files alike, so the tables use spaces only: no colour, no
box-drawing characters, and long cells are cut with an ellipsis rather than wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

__all__ = ["format_count", "format_duration", "format_time", "render_table", "shorten"]

#: Longest cell before it is cut (error messages can be kilobytes long).
DEFAULT_MAX_CELL = 80


def shorten(text: object, width: int = DEFAULT_MAX_CELL) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    flat = " ".join(str(text).split()) if text is not None else ""
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def format_count(value: int | None) -> str:
    """``12,345``, or ``-`` for no value."""
    return "-" if value is None else f"{value:,}"


def format_duration(seconds: float | None) -> str:
    """``45s``, ``12m05s``, ``3h07m``, ``2d04h``; ``-`` for no value."""
    if seconds is None:
        return "-"
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_time(value: datetime | None, *, now: datetime | None = None) -> str:
    """A timestamp as ``2026-11-29 15:18:47`` (UTC), followed by its age when `now` is given."""
    if value is None:
        return "-"
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    if now is not None:
        text += f" ({format_duration((now - value) / timedelta(seconds=1))} ago)"
    return text


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str = "(none)") -> str:
    """Left-aligned columns separated by two spaces, numbers right-aligned; `empty` when there are no rows."""
    if not rows:
        return f"  {empty}"
    cells = [[shorten(cell) for cell in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  " + "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in cells)])
