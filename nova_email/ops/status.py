"""``nova-email status``: queues, active backfills, webhook activity and recent failures, in one report.

This is the original README's monitoring SQL (``flux_pgmq_metrics``, the active-sync query,
``get_webhook_metrics``, the failed webhooks and threads) gathered in one read and printed as tables, or as
JSON (``--json``) for scripts. Nothing in the report is secret: the database is shown by its redacted URL.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO

import attrs
import psycopg
from psycopg.rows import dict_row

from ..config import Settings
from . import queries
from .connection import command_connection
from .progress import BackfillProgress, fetch_progress
from .table import format_duration, format_time, render_table

__all__ = ["StatusReport", "add_status_arguments", "collect_status", "render_status", "run_status"]

#: How far back webhook activity is counted.
DEFAULT_WEBHOOK_WINDOW = timedelta(hours=1)
#: How many recent failures are listed.
DEFAULT_FAILURES_LIMIT = 10


@attrs.frozen(kw_only=True)
class StatusReport:
    """Everything ``nova-email status`` shows, read at `observed_at` (the database's clock)."""

    database: str
    observed_at: datetime
    queues: list[dict[str, Any]]
    backfills: list[BackfillProgress]
    webhook_window_s: float
    webhooks: list[dict[str, Any]]
    failures: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (times in ISO 8601)."""
        return {
            "database": self.database,
            "observed_at": self.observed_at.isoformat(),
            "queues": [_jsonable(q) for q in self.queues],
            "backfills": [b.to_json() for b in self.backfills],
            "webhook_window_s": self.webhook_window_s,
            "webhooks": [_jsonable(w) for w in self.webhooks],
            "failures": [_jsonable(f) for f in self.failures],
        }


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = float(value)
        out[key] = value
    return out


def collect_status(
    conn: psycopg.Connection,
    *,
    database: str,
    webhook_window: timedelta = DEFAULT_WEBHOOK_WINDOW,
    failures_limit: int = DEFAULT_FAILURES_LIMIT,
) -> StatusReport:
    """Read the whole report in one repeatable-read transaction, so its sections agree with each other."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        # Read-only snapshot: the queue counts, the backfills and the failures are taken at one instant.
        cur.execute(queries.READ_ONLY_SNAPSHOT)
        queues = cur.execute(queries.QUEUE_METRICS).fetchall()
        backfills = fetch_progress(conn)
        webhooks = cur.execute(queries.WEBHOOK_ACTIVITY, {"window": webhook_window}).fetchall()
        failures = cur.execute(queries.RECENT_FAILURES, {"limit": failures_limit}).fetchall()
        row = cur.execute(queries.NOW).fetchone()
    assert row is not None
    return StatusReport(
        database=database,
        observed_at=row["now"],
        queues=queues,
        backfills=backfills,
        webhook_window_s=webhook_window / timedelta(seconds=1),
        webhooks=webhooks,
        failures=failures,
    )


def render_status(report: StatusReport) -> str:
    """The report as plain-text tables, one section per concern."""
    now = report.observed_at
    queue_rows = [
        [
            q["queue_name"],
            q["queued"],
            q["delayed"],
            q["in_flight"],
            format_duration(q["oldest_age_ms"] / 1000) if q["queued"] else "-",
            q["dead_lettered"],
        ]
        for q in report.queues
    ]
    backfill_rows = [
        [
            str(b.config_id),
            b.email or str(b.inbox_id),
            b.backfill_status,
            f"{float(b.percent_complete):.1f}%",
            f"{b.threads_done}/{b.threads_total}",
            b.threads_processing,
            b.threads_failed,
            b.messages_synced,
            f"{b.rate_per_s:.1f}/s" if b.rate_per_s is not None else "-",
            format_duration(b.eta_s),
        ]
        for b in report.backfills
    ]
    webhook_rows = [
        [
            w["notification_type"] or "(rejected)",
            w["status"],
            w["count"],
            f"{float(w['avg_duration_ms']):.1f}" if w["avg_duration_ms"] is not None else "-",
            w["max_duration_ms"] if w["max_duration_ms"] is not None else "-",
            format_time(w["newest_received_at"]),
        ]
        for w in report.webhooks
    ]
    failure_rows = [
        [format_time(f["at"], now=now), f["kind"], f["subject"], f["error"] or "-"] for f in report.failures
    ]
    sections = [
        f"Nova Email status at {format_time(now)} UTC ({report.database})",
        "",
        "Queues",
        render_table(["queue", "ready", "delayed", "in flight", "oldest", "dead letters"], queue_rows),
        "",
        "Active backfills",
        render_table(
            ["config", "inbox", "status", "done", "threads", "processing", "failed", "messages", "rate", "ETA"],
            backfill_rows,
        ),
        "",
        f"Webhooks in the last {format_duration(report.webhook_window_s)}",
        render_table(["type", "status", "count", "avg ms", "max ms", "newest"], webhook_rows),
        "",
        "Recent failures",
        render_table(["when", "kind", "what", "error"], failure_rows),
    ]
    return "\n".join(sections)


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nova-email status``."""
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--window",
        type=float,
        default=DEFAULT_WEBHOOK_WINDOW / timedelta(minutes=1),
        metavar="MINUTES",
        help="how far back webhook activity is counted (default: %(default)g)",
    )
    parser.add_argument(
        "--failures",
        type=int,
        default=DEFAULT_FAILURES_LIMIT,
        metavar="N",
        help="how many recent failures to list (default: %(default)s)",
    )


def run_status(settings: Settings, args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Print the status report; exit status 0."""
    out = out or sys.stdout
    database = settings.database_url_redacted or f"embedded PostgreSQL in {settings.data_dir}"
    with command_connection(settings) as conn:
        report = collect_status(
            conn,
            database=database,
            webhook_window=timedelta(minutes=args.window),
            failures_limit=args.failures,
        )
    if args.json:
        json.dump(report.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(render_status(report) + "\n")
    return 0
