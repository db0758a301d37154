"""A burst of 20,000 webhooks enqueued at once, processed by real workers: memory, latency and drain time.

The burst is one transaction of ``queue_nylas_webhook_notification`` calls (the SQL intake every receiver uses),
each a ``message.updated`` event for a message that exists in the Nylas simulator, so every event costs a real
API call and an upsert. Workers are ``dramatiq nova_email.actors`` on the webhook queue, started idle before the
burst. The benchmark samples each worker process's RSS every 200 ms and the queue depth until it drains, then
reads the latency of every event from its audit row.

Usage:
    .venv/bin/python bench/webhook_burst.py [--webhooks 20000] [--processes 2] [--threads 8] [--json]

Figures:
    peak RSS per worker process (MiB), p50/p99/max time from the burst's commit to each event's processed_at,
    drain time (commit to empty queue), throughput, and the counts that must be exact: lost = 0, duplicates = 0.

The database is a scratch one on BENCH_DATABASE_URL's server (default: the local PostgreSQL), dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.processes import stop  # noqa: E402
from nova_email.db import with_database  # noqa: E402
from nova_email.migrate import migrate  # noqa: E402
from nova_email.simulator.server import start_in_thread  # noqa: E402

GRANT = "grant-burst"
QUEUE = "nylas_webhook_notifications"

#: One transaction: an audit row and a queue message per event, each for one of the mailbox's messages in turn.
BURST = """
select count(*) from generate_series(1, %(n)s) as i,
lateral queue_nylas_webhook_notification(
    'burst-' || i, 'message.updated', %(grant)s::text,
    jsonb_build_object(
        'id', 'burst-' || i, 'type', 'message.updated', 'time', extract(epoch from now())::bigint,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', (%(ids)s::text[])[1 + (i %% cardinality(%(ids)s::text[]))], 'grant_id', %(grant)s::text, 'object', 'message'))
    )
)
"""

LATENCIES = """
select percentile_cont(0.5) within group (order by ms), percentile_cont(0.99) within group (order by ms), max(ms)
from (select extract(epoch from processed_at - %(visible_at)s) * 1000 as ms
      from flux_webhook_notifications where webhook_id like 'burst-%%') as t
"""


def admin_url() -> str:
    return os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new database, migrated like production, dropped afterwards."""
    name = f"bench_burst_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        admin.execute(f'create database "{name}"')  # name made of a fixed prefix and hex digits
    url = with_database(admin_url(), name)  # the workers' settings want a URL
    try:
        with psycopg.connect(url) as conn:
            migrate(conn)
        yield url
    finally:
        with psycopg.connect(admin_url(), autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


@contextmanager
def webhook_workers(env: dict[str, str], processes: int, threads: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "dramatiq", "nova_email.actors", "--queues", QUEUE]
    cmd += ["--processes", str(processes), "--threads", str(threads)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while log.read_text(errors="replace").count("Worker process is ready") < processes:
                if proc.poll() is not None or time.monotonic() > deadline:
                    msg = f"workers did not start:\n{log.read_text(errors='replace')[-3000:]}"
                    raise RuntimeError(msg)
                time.sleep(0.1)
            yield proc
        finally:
            stop(proc, timeout_s=60)


def run(n: int, processes: int, threads: int, log: Path) -> dict[str, Any]:
    nylas = start_in_thread(seed=71, grants=[GRANT], threads_per_grant=400, large_body_share=0.0)
    try:
        message_ids = [m["id"] for m in nylas.export(GRANT, with_bodies=False)["messages"]]
        with scratch_database() as url, psycopg.connect(url, autocommit=True) as conn:
            conn.execute("insert into flux_inboxes (nylas_grant_id) values (%s)", [GRANT])
            env = {
                "DATABASE_URL": url,
                "NYLAS_API_URI": nylas.base_url,
                "NYLAS_API_KEY": "bench",
                "NYLAS_GRANT_RATE": "0",
                "THREAD_DELAY_MS": "0",
                "MESSAGE_DELAY_MS": "0",
                "API_DELAY_MS": "0",
                "POLL_INTERVAL_MS": "200",
                "LOG_LEVEL": "info",  # "Worker process is ready" is an info line
            }
            with webhook_workers(env, processes, threads, log) as main:
                children = psutil.Process(main.pid).children()
                peak_rss = dict.fromkeys((c.pid for c in children), 0)
                enqueue_started = time.perf_counter()
                with conn.transaction():
                    conn.execute(BURST, {"n": n, "grant": GRANT, "ids": message_ids})
                row = conn.execute("select clock_timestamp()").fetchone()
                assert row is not None
                visible_at = row[0]
                enqueue_s = time.perf_counter() - enqueue_started
                started = time.perf_counter()
                depth_samples: list[tuple[float, int]] = []
                while True:
                    for child in children:
                        try:
                            peak_rss[child.pid] = max(peak_rss[child.pid], child.memory_info().rss)
                        except psutil.NoSuchProcess:
                            pass
                    depth_row = conn.execute("select count(*) from pgmq.q_nylas_webhook_notifications").fetchone()
                    depth = int(depth_row[0]) if depth_row else -1
                    depth_samples.append((time.perf_counter() - started, depth))
                    if depth == 0:
                        break
                    if time.perf_counter() - started > 900:
                        msg = f"the queue did not drain in 900 s ({depth} left)"
                        raise RuntimeError(msg)
                    time.sleep(0.2)
                drain_s = time.perf_counter() - started
                worker_alive = main.poll() is None
            statuses: dict[str, int] = dict(
                conn.execute("select status, count(*) from flux_webhook_notifications group by 1").fetchall()
            )
            p50, p99, worst = conn.execute(LATENCIES, {"visible_at": visible_at}).fetchone() or (0, 0, 0)
            duplicates = conn.execute(
                "select count(*) - count(distinct webhook_id) from flux_webhook_notifications"
            ).fetchone()
            dead = conn.execute("select count(*) from pgmq_broker.dead_letters").fetchone()
        api_calls = sum(nylas.simulator.calls.snapshot().values())
    finally:
        nylas.stop()
    terminal = sum(v for k, v in statuses.items() if k in ("processed", "ignored", "error"))
    return {
        "webhooks": n,
        "processes": processes,
        "threads": threads,
        "enqueue_s": round(enqueue_s, 2),
        "drain_s": round(drain_s, 1),
        "throughput_per_s": round(n / drain_s, 1),
        "latency_ms": {"p50": round(p50), "p99": round(p99), "max": round(worst)},
        "peak_rss_mib_per_worker": sorted(round(v / 2**20, 1) for v in peak_rss.values()),
        "statuses": statuses,
        "lost": n - terminal,
        "duplicates": duplicates[0] if duplicates else None,
        "dead_letters": dead[0] if dead else None,
        "nylas_api_calls": api_calls,
        "workers_alive_at_end": worker_alive,
        "queue_depth_samples": len(depth_samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webhooks", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--log", type=Path, default=Path("/tmp/webhook_burst_workers.log"))
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    figures = run(args.webhooks, args.processes, args.threads, args.log)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"Webhook burst: {figures['webhooks']} events, {args.processes} processes x {args.threads} threads")
    print(f"  enqueue (one transaction)   {figures['enqueue_s']} s")
    print(f"  drain (commit -> empty)     {figures['drain_s']} s, {figures['throughput_per_s']} events/s")
    lat = figures["latency_ms"]
    print(f"  commit -> processed         p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms")
    print(f"  peak RSS per worker         {figures['peak_rss_mib_per_worker']} MiB")
    print(f"  statuses                    {figures['statuses']}")
    print(f"  lost {figures['lost']}, duplicates {figures['duplicates']}, dead letters {figures['dead_letters']}")
    print(f"  Nylas API calls             {figures['nylas_api_calls']}")


if __name__ == "__main__":
    main()
