"""Benchmark of the webhook intake: signed deliveries accepted per second, measured with wrk on loopback.

Scenarios, each against the real server (gunicorn, `serve_in_background`) and a freshly emptied database:
    unique      every request a new event (pre-signed bodies, a disjoint slice per wrk thread): the full path,
                one audit row and one queue message per request
    duplicate   one event sent over and over: the redelivery path (one row, then dedup on every request)
    latency     unique events at low concurrency: how long one delivery waits for its 200

Usage:
    .venv/bin/python bench/intake.py [--duration 10] [--connections 32] [--workers 2] [--threads 8]

Needs `wrk` (Debian: apt-get install -y wrk). The database is a scratch one created on BENCH_DATABASE_URL's
server (default: the local PostgreSQL at 127.0.0.1:5432), migrated, and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from nova_email.config import Settings
from nova_email.db import with_database
from nova_email.intake import RunningIntake, serve_in_background, sign
from nova_email.migrate import migrate

SECRET = "b3nch" * 13

#: wrk script: each thread takes every n-th pre-signed body, so threads never send the same event.
LUA_UNIQUE = r"""
local counter = 1
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  local path, nthreads = args[1], tonumber(args[2])
  signatures, bodies, sent = {}, {}, 0
  local index = 0
  for line in io.lines(path) do
    if index % nthreads == id - 1 then
      local tab = line:find("\t", 1, true)
      signatures[#signatures + 1] = line:sub(1, tab - 1)
      bodies[#bodies + 1] = line:sub(tab + 1)
    end
    index = index + 1
  end
end

function request()
  sent = sent + 1
  local k = ((sent - 1) % #bodies) + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["X-Nylas-Signature"] = signatures[k]},
                    bodies[k])
end
"""

#: wrk script: the same signed body every time.
LUA_DUPLICATE = r"""
function init(args)
  local line = io.lines(args[1])()
  local tab = line:find("\t", 1, true)
  signature, body = line:sub(1, tab - 1), line:sub(tab + 1)
end

function request()
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["X-Nylas-Signature"] = signature}, body)
end
"""

#: Appended to both scripts: one JSON line with the totals and latency percentiles.
LUA_DONE = r"""
function done(summary, latency, requests)
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "non_2xx_3xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def envelope(index: int) -> bytes:
    """A message.created delivery of realistic size (~650 bytes), as Nylas sends it."""
    document = {
        "specversion": "1.0",
        "type": "message.created",
        "source": "/google/emails/realtime",
        "id": f"ntf_bench_{index:08d}_{secrets.token_hex(4)}",
        "time": 1735776005,
        "webhook_delivery_attempt": 1,
        "data": {
            "application_id": "app-bench",
            "object": {
                "object": "message",
                "id": f"msg_{index:08d}",
                "grant_id": "grant-bench",
                "thread_id": f"thr_{index // 4:08d}",
                "subject": "Re: Quarterly numbers for the bench",
                "from": [{"email": "bob@example.net", "name": "Bob"}],
                "to": [{"email": "ada@example.org", "name": "Ada"}],
                "date": 1735776000,
                "snippet": "Attached are the figures we discussed on Tuesday; let me know if anything is off.",
                "unread": True,
                "folders": ["INBOX", "UNREAD"],
            },
        },
    }
    return json.dumps(document).encode()


def write_bodies(path: Path, count: int) -> None:
    with path.open("wb") as out:
        for index in range(count):
            body = envelope(index)
            out.write(sign(SECRET, body).encode() + b"\t" + body + b"\n")


def run_wrk(
    url: str, script: str, args: list[str], *, duration_s: int, connections: int, threads: int
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script + LUA_DONE)
    try:
        command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s", "--timeout", "10s",
                   "-s", handle.name, url, "--", *args]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    line = next(line for line in output.splitlines() if line.startswith("BENCH_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def stored(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    rows = conn.execute("select count(*) from flux_webhook_notifications").fetchone()
    messages = conn.execute("select count(*) from pgmq.q_nylas_webhook_notifications").fetchone()
    assert rows is not None and messages is not None
    return int(rows[0]), int(messages[0])


def settle(conn: psycopg.Connection[Any], *, deadline_s: float = 15.0) -> tuple[int, int]:
    """Counts once requests still in flight when wrk stopped (sent, not counted by wrk) have landed."""
    deadline = time.monotonic() + deadline_s
    last = stored(conn)
    while time.monotonic() < deadline:
        time.sleep(0.3)  # a bench, not a test: wait until the counts stop moving
        current = stored(conn)
        if current == last:
            return current
        last = current
    return last


def empty(conn: psycopg.Connection[Any]) -> None:
    conn.execute("truncate flux_webhook_notifications")
    conn.execute("select pgmq.purge_queue('nylas_webhook_notifications')")


def report(name: str, result: dict[str, Any], conn: psycopg.Connection[Any], expected_rows: str) -> None:
    rows, messages = settle(conn)
    print(
        f"{name:<10} {result['rps']:>8.0f} req/s  {result['requests']:>7} requests  "
        f"p50 {result['p50_us'] / 1000:.2f} ms  p90 {result['p90_us'] / 1000:.2f} ms  "
        f"p99 {result['p99_us'] / 1000:.2f} ms  max {result['max_us'] / 1000:.1f} ms  "
        f"non-2xx {result['non_2xx_3xx']}  socket errors {result['socket_errors']}  "
        f"rows {rows}  queued {messages}  (expected {expected_rows}; "
        f"{'rows = messages' if rows == messages else 'MISMATCH rows != messages'})",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=32, help="concurrent wrk connections")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="database connections per worker")
    parser.add_argument("--bodies", type=int, default=60_000, help="distinct pre-signed events for `unique`")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed; install it with `apt-get install -y wrk`", file=sys.stderr)
        return 2

    admin_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"h7_bench_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    url = with_database(admin_url, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn, tempfile.TemporaryDirectory() as scratch:
            migrate(conn)
            bodies = Path(scratch) / "bodies.tsv"
            write_bodies(bodies, args.bodies)
            settings = Settings(
                database_url=url, nylas_webhook_secret=SECRET, data_dir=Path(scratch), log_level="error"
            )
            print(
                f"intake: gunicorn {args.workers} workers x {args.threads} database connections; wrk {args.wrk_threads} threads, "
                f"{args.connections} connections, {args.duration} s per scenario; {os.cpu_count()} CPUs",
                flush=True,
            )
            with serve_in_background(settings, workers=args.workers, threads=args.threads) as server:
                run_scenarios(server, conn, bodies, args)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')
    return 0


def run_scenarios(server: RunningIntake, conn: psycopg.Connection[Any], bodies: Path, args: argparse.Namespace) -> None:
    common = {"duration_s": args.duration, "threads": args.wrk_threads}
    # A short warm-up so that every worker has its pool connections open before measuring.
    run_wrk(server.webhook_url, LUA_DUPLICATE, [str(bodies)], duration_s=2, connections=8, threads=1)
    empty(conn)

    result = run_wrk(server.webhook_url, LUA_UNIQUE, [str(bodies), str(args.wrk_threads)],
                     connections=args.connections, **common)  # fmt: skip
    distinct = min(result["requests"], args.bodies)
    report("unique", result, conn, f">= {distinct}, one per distinct event sent")
    empty(conn)

    result = run_wrk(server.webhook_url, LUA_DUPLICATE, [str(bodies)], connections=args.connections, **common)
    report("duplicate", result, conn, "1")
    empty(conn)

    result = run_wrk(server.webhook_url, LUA_UNIQUE, [str(bodies), "1"], duration_s=args.duration, connections=4,
                     threads=1)  # fmt: skip
    report("latency", result, conn, f">= {min(result['requests'], args.bodies)}; 4 connections")
    empty(conn)


if __name__ == "__main__":
    sys.exit(main())
