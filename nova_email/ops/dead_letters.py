"""``nova-email dead-letters list|show|replay``: what the broker gave up on, per queue, and sending it back.

The records are the broker's (``pgmq_broker.dead_letters``, see ``brokers.dead_letters``); replaying goes
through the broker's own ``replay_dead_letters``, which re-sends and deletes the record in one transaction
with a fresh retry budget. Replay only after fixing the cause, or the messages come straight back.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any, TextIO

import attrs
import psycopg
from psycopg.rows import class_row, dict_row

from brokers import DeadLetter
from brokers.dead_letters import replay_dead_letters

from ..config import Settings
from . import queries
from .connection import command_connection
from .table import format_time, render_table

__all__ = [
    "add_dead_letters_arguments",
    "count_dead_letters_by_queue",
    "get_dead_letter",
    "list_recent_dead_letters",
    "run_dead_letters",
]

#: Dead letters listed when ``--limit`` is not given.
DEFAULT_LIST_LIMIT = 20


def count_dead_letters_by_queue(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """``{queue_name, count, oldest, newest}`` for each queue that has dead letters."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries.DEAD_LETTER_COUNTS).fetchall()


def list_recent_dead_letters(
    conn: psycopg.Connection, *, queue_name: str | None = None, limit: int = DEFAULT_LIST_LIMIT
) -> list[DeadLetter]:
    """The newest `limit` dead letters, of one queue or all, newest first."""
    with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        return cur.execute(queries.LIST_DEAD_LETTERS, {"queue": queue_name, "limit": limit}).fetchall()


def get_dead_letter(conn: psycopg.Connection, dead_letter_id: int) -> DeadLetter | None:
    """One dead letter with its message and traceback, or None."""
    with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        return cur.execute(queries.GET_DEAD_LETTER, {"id": dead_letter_id}).fetchone()


def _to_json(letter: DeadLetter) -> dict[str, Any]:
    data = attrs.asdict(letter)
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}


def _error_text(letter: DeadLetter) -> str:
    parts = [letter.reason, letter.error_type, letter.error_message]
    return ": ".join(p for p in parts if p)


def _list(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    counts = count_dead_letters_by_queue(conn)
    letters = list_recent_dead_letters(conn, queue_name=args.queue, limit=args.limit)
    if args.json:
        json.dump(
            {
                "queues": [{**c, "oldest": c["oldest"].isoformat(), "newest": c["newest"].isoformat()} for c in counts],
                "dead_letters": [_to_json(d) for d in letters],
            },
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    out.write("Dead letters per queue\n")
    out.write(
        render_table(
            ["queue", "count", "oldest", "newest"],
            [[c["queue_name"], c["count"], format_time(c["oldest"]), format_time(c["newest"])] for c in counts],
        )
        + "\n\n"
    )
    scope = f"queue {args.queue}" if args.queue else "all queues"
    out.write(f"Newest {args.limit} of {scope} (details: nova-email dead-letters show ID)\n")
    rows = [
        [d.id, d.queue_name, d.actor_name or "-", d.attempts, format_time(d.dead_at), _error_text(d)] for d in letters
    ]
    out.write(render_table(["id", "queue", "actor", "attempts", "dead at", "why"], rows) + "\n")
    return 0


def _show(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    letter = get_dead_letter(conn, args.id)
    if letter is None:
        print(
            f"nova-email dead-letters: no dead letter #{args.id}; see `nova-email dead-letters list`", file=sys.stderr
        )
        return 2
    if args.json:
        json.dump(_to_json(letter), out, indent=2)
        out.write("\n")
        return 0
    fields = [
        ("id", letter.id),
        ("queue", letter.queue_name),
        ("actor", letter.actor_name),
        ("message id", letter.message_id),
        ("PGMQ msg id", letter.msg_id),
        ("reason", letter.reason),
        ("error", ": ".join(p for p in (letter.error_type, letter.error_message) if p) or "-"),
        ("attempts", letter.attempts),
        ("enqueued at", format_time(letter.enqueued_at)),
        ("dead at", format_time(letter.dead_at)),
    ]
    for name, value in fields:
        out.write(f"{name + ':':<13}{value if value is not None else '-'}\n")
    out.write("message:\n" + json.dumps(letter.message, indent=2, default=str) + "\n")
    if letter.traceback:
        out.write("traceback:\n" + letter.traceback.rstrip() + "\n")
    return 0


def _replay(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    if not (args.all or args.queue or args.ids):
        print(
            "nova-email dead-letters: say what to replay: --queue QUEUE, --id ID (repeatable) or --all", file=sys.stderr
        )
        return 2
    replayed = replay_dead_letters(conn, queue_name=args.queue, ids=args.ids or None, limit=args.limit)
    scope = f" of queue {args.queue}" if args.queue else ""
    out.write(f"Replayed {replayed} dead letter(s){scope} with a fresh retry budget.\n")
    return 0


def add_dead_letters_arguments(parser: argparse.ArgumentParser) -> None:
    """Subcommands of ``nova-email dead-letters``: ``list``, ``show`` and ``replay``."""
    sub = parser.add_subparsers(dest="dead_letters_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="counts per queue and the newest dead letters")
    listing.add_argument("--queue", help="only this queue")
    listing.add_argument("--limit", type=int, default=DEFAULT_LIST_LIMIT, help="how many to list")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = sub.add_parser("show", help="one dead letter with its message and traceback")
    show.add_argument("id", type=int, help="the dead letter's id (from `list`)")
    show.add_argument("--json", action="store_true", help="print JSON")
    replay = sub.add_parser("replay", help="send dead letters back to their queues (after fixing the cause)")
    replay.add_argument("--queue", help="replay this queue's dead letters")
    replay.add_argument("--id", dest="ids", type=int, action="append", help="replay this one (repeatable)")
    replay.add_argument("--all", action="store_true", help="replay every dead letter of every queue")
    replay.add_argument("--limit", type=int, default=None, help="replay at most this many, oldest first")


def run_dead_letters(settings: Settings, args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run ``nova-email dead-letters <action>``; exit 0, or 2 for an unknown id or a missing selection."""
    actions = {"list": _list, "show": _show, "replay": _replay}
    with command_connection(settings) as conn:
        return actions[args.dead_letters_command](conn, args, out or sys.stdout)
