"""Backfill benchmark: Nylas calls per thread, how fast a large inbox is synced, memory against mailbox size, and
how much of a rate limit the pacing uses.

Scenario 1, throughput: a simulated inbox of 15,000 threads, about 10,000 of them (about 58,000 messages) in the
one-year window that is synced, no faults, pacing off; ``dramatiq nova_email.actors`` with 2 processes x 8 threads.
Prints threads/s and messages/s, Nylas API calls per synced thread and per 1,000 messages (by endpoint), the API
time that many calls need at the default pacing (10 calls/s per grant), and the peak RSS of each worker process.

Scenario 1a, the small mailbox ``nova-email fake-nylas`` serves without options (100 threads, seed 0), pacing off:
calls per synced thread and per 1,000 messages (by endpoint). Its threads hold fewer messages (about 5 in the year)
than scenario 1's (about 5.8, the mailbox on which the two-calls-per-thread code spent 346 calls per 1,000 messages),
so with one call per thread its calls per 1,000 messages are higher.

Scenario 1b, default pacing: a 300-thread inbox synced at the default NYLAS_GRANT_RATE (10/s, burst 10), measured:
the wall time a customer waits, which the calls per thread decide.

Scenario 1c, mailbox size: only the backfill processor (1 process x 1 thread) lists mailboxes of 10,000 and 50,000
threads and fans out their thread jobs; prints the listing time and the peak RSS of the worker, which must not grow
with the mailbox (the thread list is never held whole).

Scenarios 1, 1a and 1b run twice in the same invocation: as the service is, and with the thread jobs' listed copies
ignored (a trigger in the scratch database drops ``queued_threads.listed_thread``), so every thread job also fetches
its thread: the two calls per thread of the code before issue 12. Each figure is printed with its ratio to that peer.
Scenario 1c prints the ratio of the peak RSS at the largest mailbox to that at the smallest (ideal: 1).

Scenario 2, pacing: an inbox of 2,000 threads served by a simulator that allows R calls/s per grant (429 with
Retry-After above it; R is 100 by default, half of Nylas's 200/s per grant for messages and threads), with the
service paced at the same R per grant. Prints the share of the allowed rate actually used
(calls answered 200 / (R x elapsed)), and the 429s seen. For comparison, the original's fixed delays
(THREAD_DELAY_MS 3000 + API_DELAY_MS 200 between calls, one thread at a time) allow at most about
(2 + m) / (3 + 0.2 x (1 + m)) calls/s for a thread of m messages: with m = 6 that is about 1.8 calls/s.

Usage:
    .venv/bin/python bench/backfill.py [--threads 15000] [--paced-threads 300] [--sizes 10000,50000]
                                       [--rate 100] [--rate-threads 2000] [--skip-...]

The database is a scratch one on BENCH_DATABASE_URL's server (default: the local PostgreSQL at 127.0.0.1:5432),
migrated with nova_email.migrate and dropped at the end. The simulator runs as its own process
(``nova-email fake-nylas``), as Nylas would, so it does not share this process's GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import psutil
import psycopg
from psycopg.rows import class_row, scalar_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.processes import stop_groups, worker_processes  # noqa: E402
from nova_email.db import with_database  # noqa: E402
from nova_email.migrate import migrate  # noqa: E402

GRANT = "bench-grant"
DAY_S = 86_400
#: The default per-grant pacing (NYLAS_GRANT_RATE).
DEFAULT_RATE = 10.0
#: The peer's switch: every listed copy is dropped as it is written, so each thread job fetches its thread as well
#: as its messages (two calls per thread), the rest of the service unchanged.
IGNORE_LISTED_COPIES = """
create function bench_ignore_listed_copy() returns trigger language plpgsql as $$
begin
    new.listed_thread := null;
    return new;
end;
$$;
create trigger bench_ignore_listed_copy before insert or update on queued_threads
    for each row execute function bench_ignore_listed_copy();
"""
#: The two variants of scenarios 1 and 1b, the service first.
VARIANTS = (("service", False), ("two calls per thread (peer)", True))


@attrs.frozen
class Progress:
    """A backfill's progress as ``get_sync_progress`` reports it."""

    backfill_status: str
    threads_total: int
    threads_completed: int
    threads_failed: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return json.load(response)


class Run:
    """One scenario: a scratch database, a simulator process, worker processes."""

    def __init__(self, server_url: str, *, threads: int | None, sim_args: list[str], worker_env: dict[str, str],
                 processes: int, worker_threads: int, queues: list[str] | None = None,
                 ignore_listed_copies: bool = False) -> None:  # fmt: skip
        self.name = f"nova_bench_{secrets.token_hex(3)}"
        self.server_url = server_url
        self.anchor = int(time.time()) // DAY_S * DAY_S
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'create database "{self.name}"')
        self.url = with_database(server_url, self.name)
        with psycopg.connect(self.url) as conn:
            migrate(conn)
            if ignore_listed_copies:
                conn.execute(IGNORE_LISTED_COPIES)
        port = free_port()
        self.sim_url = f"http://127.0.0.1:{port}"
        # No thread count: the simulator's default mailbox (its default size and seed).
        mailbox = [] if threads is None else ["--threads", str(threads), "--seed", "1"]
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "nova_email.cli", "fake-nylas", "--port", str(port), "--grants", GRANT,
             *mailbox, "--anchor", str(self.anchor), *sim_args],  # fmt: skip
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                sim_get(self.sim_url, "/_sim/health")
                break
            except OSError:
                if time.monotonic() > deadline or self.sim.poll() is not None:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.2)
        env = {**os.environ, "DATABASE_URL": self.url, "NYLAS_API_URI": self.sim_url, "NYLAS_API_KEY": "bench",
               "COMPLETION_CHECK_INTERVAL_MS": "1000", "LOG_LEVEL": "warning", **worker_env}  # fmt: skip
        self.log = open(ROOT / ".nova" / "bench-backfill-workers.log", "ab")  # noqa: SIM115
        self.workers = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "nova_email.actors", "--processes", str(processes),
             "--threads", str(worker_threads), *(["--queues", *queues] if queues else [])],  # fmt: skip
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.peak_rss: dict[int, int] = {}

    def sample_rss(self) -> None:
        for child in worker_processes(self.workers):
            try:
                rss = child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            self.peak_rss[child.pid] = max(self.peak_rss.get(child.pid, 0), rss)

    def backfill(
        self, timeout_s: float, *, until: tuple[str, ...] = ("completed", "failed")
    ) -> tuple[float, dict[str, Any]]:
        """Queue the backfill, wait until its status is one of `until`; returns (seconds, totals)."""
        with psycopg.connect(self.url, autocommit=True) as conn, conn.cursor(row_factory=scalar_row) as scalar:
            inbox_id = scalar.execute(
                "insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [GRANT]
            ).fetchone()
            end = datetime.fromtimestamp(self.anchor, UTC) + timedelta(days=1)
            started = time.monotonic()
            config_id = scalar.execute(
                "select config_id from queue_inbox_backfill(%s, null, null, %s)", [inbox_id, end]
            ).fetchone()
            with conn.cursor(row_factory=class_row(Progress)) as cur:
                while True:
                    self.sample_rss()
                    progress = cur.execute(
                        "select backfill_status, threads_total, threads_completed, threads_failed"
                        " from get_sync_progress(%s)",
                        [config_id],
                    ).fetchone()
                    assert progress is not None
                    if progress.backfill_status in until:
                        break
                    if time.monotonic() - started > timeout_s:
                        raise RuntimeError(f"backfill not done after {timeout_s} s: {progress}")
                    time.sleep(0.5)
            elapsed = time.monotonic() - started
            messages = scalar.execute("select count(*) from flux_email_messages").fetchone()
            listed = scalar.execute("select count(*) from queued_threads").fetchone()
            # The working time: from the request to the last thread synced (without the monitor's detection lag).
            working = scalar.execute(
                "select extract(epoch from max(q.processed_at) - c.backfill_requested_at) from queued_threads q"
                " join flux_inbox_configurations c on c.id = q.config_id where c.id = %s group by c.id",
                [config_id],
            ).fetchone()
        return elapsed, {"threads": progress.threads_total, "completed": progress.threads_completed,
                         "failed": progress.threads_failed, "messages": messages, "listed": listed,
                         "status": progress.backfill_status,
                         "working_s": float(working) if working is not None else elapsed}  # fmt: skip

    def calls(self) -> dict[tuple[str, int], int]:
        stats = sim_get(self.sim_url, "/_sim/stats")
        return {(c["endpoint"], c["status"]): c["count"] for c in stats["calls"]}

    def close(self) -> None:
        stop_groups(self.workers, self.sim, timeout_s=30)
        self.log.close()
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{self.name}" with (force)')


def measure(run: Run, until: tuple[str, ...] = ("completed", "failed")) -> tuple[float, dict[str, Any], dict[Any, int]]:
    """Run the backfill of `run` until its status is one of `until`, then stop everything it started."""
    try:
        elapsed, totals = run.backfill(timeout_s=3600, until=until)
        calls = run.calls()
    finally:
        run.close()
    return elapsed, totals, calls


def _ratio(value: float, peer: float) -> str:
    return f"{value / peer:.2f}x the peer" if peer else "peer: none"


def throughput(server_url: str, args: argparse.Namespace) -> None:
    print(f"\nScenario 1: {args.threads} threads in the mailbox, pacing off, {args.processes} x {args.worker_threads}")
    figures: list[dict[str, float]] = []
    for name, ignore in VARIANTS:
        run = Run(server_url, threads=args.threads, sim_args=["--large-body-share", "0.01"],
                  worker_env={"NYLAS_GRANT_RATE": "0", "THREAD_DELAY_MS": "0", "MESSAGE_DELAY_MS": "0",
                              "API_DELAY_MS": "0"},
                  processes=args.processes, worker_threads=args.worker_threads,
                  ignore_listed_copies=ignore)  # fmt: skip
        elapsed, totals, calls = measure(run)
        total_calls = sum(calls.values())
        figures.append({
            "calls_per_thread": total_calls / max(totals["completed"], 1),
            "calls_per_1000": 1000 * total_calls / max(totals["messages"], 1),
            "threads_per_s": totals["completed"] / elapsed,
            "api_min": total_calls / DEFAULT_RATE / 60,
        })  # fmt: skip
        rss = ", ".join(f"{r / 2**20:.0f} MiB" for r in sorted(run.peak_rss.values()))
        print(f"  {name}:")
        print(f"    synced        {totals['completed']} threads, {totals['messages']} messages in {elapsed:.1f} s "
              f"(status {totals['status']}, {totals['failed']} failed), "
              f"{totals['completed'] / elapsed:.1f} threads/s")  # fmt: skip
        print(f"    API calls     {total_calls}: {figures[-1]['calls_per_thread']:.3f} per synced thread, "
              f"{figures[-1]['calls_per_1000']:.0f} per 1,000 messages; {dict(sorted(calls.items()))}")  # fmt: skip
        print(f"    at {DEFAULT_RATE:g} calls/s  {figures[-1]['api_min']:.1f} min of API time; peak RSS {rss}")
    service, peer = figures
    print(f"  ratio         calls per thread {_ratio(service['calls_per_thread'], peer['calls_per_thread'])}, "
          f"API time {_ratio(service['api_min'], peer['api_min'])}, "
          f"threads/s {_ratio(service['threads_per_s'], peer['threads_per_s'])}")  # fmt: skip


def default_mailbox(server_url: str, args: argparse.Namespace) -> None:
    print("\nScenario 1a: the simulator's default mailbox (`nova-email fake-nylas` without options), pacing off")
    figures: list[float] = []
    for name, ignore in VARIANTS:
        run = Run(server_url, threads=None, sim_args=[], worker_env={"NYLAS_GRANT_RATE": "0"},
                  processes=args.processes, worker_threads=args.worker_threads,
                  ignore_listed_copies=ignore)  # fmt: skip
        _, totals, calls = measure(run)
        total_calls = sum(calls.values())
        figures.append(1000 * total_calls / max(totals["messages"], 1))
        print(f"  {name}: {totals['completed']} threads, {totals['messages']} messages in the year, {total_calls} "
              f"calls: {total_calls / max(totals['completed'], 1):.3f} per synced thread, {figures[-1]:.0f} per "
              f"1,000 messages; {dict(sorted(calls.items()))}")  # fmt: skip
    print(f"  ratio         calls per 1,000 messages {_ratio(figures[0], figures[1])}")


def default_pacing(server_url: str, args: argparse.Namespace) -> None:
    print(
        f"\nScenario 1b: {args.paced_threads} threads in the mailbox, default pacing ({DEFAULT_RATE:g} calls/s per grant)"
    )
    walls: list[float] = []
    for name, ignore in VARIANTS:
        run = Run(server_url, threads=args.paced_threads, sim_args=["--large-body-share", "0"], worker_env={},
                  processes=args.processes, worker_threads=args.worker_threads,
                  ignore_listed_copies=ignore)  # fmt: skip
        elapsed, totals, calls = measure(run)
        total_calls = sum(calls.values())
        walls.append(totals["working_s"])
        print(f"  {name}: {totals['completed']} threads, {totals['messages']} messages, {total_calls} calls "
              f"({total_calls / max(totals['completed'], 1):.3f} per thread); {totals['working_s']:.1f} s to the "
              f"last thread synced, completion seen after {elapsed:.1f} s")  # fmt: skip
    print(f"  ratio         wall time {_ratio(walls[0], walls[1])}")


def mailbox_sizes(server_url: str, args: argparse.Namespace) -> None:
    print("\nScenario 1c: the backfill processor alone (1 x 1) lists a mailbox and fans out its thread jobs")
    peaks: list[float] = []
    for size in (int(n) for n in args.sizes.split(",")):
        run = Run(server_url, threads=size, sim_args=["--large-body-share", "0"],
                  worker_env={"NYLAS_GRANT_RATE": "0"}, processes=1, worker_threads=1,
                  queues=["inbox_backfill_jobs"])  # fmt: skip
        elapsed, totals, calls = measure(run, until=("thread_sync", "completed", "failed"))
        peaks.append(max(run.peak_rss.values(), default=0) / 2**20)
        print(f"  {size:>6} threads  {totals['listed']} listed in {sum(calls.values())} calls, status "
              f"{totals['status']} after {elapsed:.1f} s; peak RSS {peaks[-1]:.0f} MiB")  # fmt: skip
    if len(peaks) > 1 and peaks[0]:
        print(f"  ratio         peak RSS of the largest mailbox / the smallest = {peaks[-1] / peaks[0]:.2f} (ideal 1)")


def pacing(server_url: str, args: argparse.Namespace) -> None:
    rate = args.rate
    run = Run(server_url, threads=args.rate_threads,
              sim_args=["--rate-limit-per-s", str(rate), "--rate-limit-burst", str(int(rate)),
                        "--large-body-share", "0"],
              worker_env={"NYLAS_GRANT_RATE": str(rate), "NYLAS_GRANT_BURST": str(int(rate))},
              processes=args.processes, worker_threads=args.worker_threads)  # fmt: skip
    elapsed, totals, calls = measure(run)
    ok = sum(n for (_, status), n in calls.items() if status == 200)
    limited = sum(n for (_, status), n in calls.items() if status == 429)
    working = totals["working_s"]
    used = ok / (rate * working)
    print(
        f"\nScenario 2: {args.rate_threads} threads, the simulator allows {rate:g} calls/s per grant, pacing {rate:g}/s"
    )
    print(f"  synced        {totals['completed']} threads, {totals['messages']} messages in {working:.1f} s "
          f"(completion seen after {elapsed:.1f} s)")  # fmt: skip
    print(f"  API rate used {ok / working:.1f} of {rate:g} calls/s allowed = {100 * used:.0f} % "
          f"({ok} calls answered, {limited} answered 429)")  # fmt: skip
    original = (2 + 6) / (3 + 0.2 * 7)
    print(
        f"  the original  at most ~{original:.1f} calls/s with its fixed delays = {100 * original / rate:.0f} % of {rate:g}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=15_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=8)
    parser.add_argument("--paced-threads", type=int, default=300)
    parser.add_argument("--sizes", default="10000,50000", help="mailbox sizes of scenario 1c")
    parser.add_argument("--rate", type=float, default=100.0, help="allowed calls/s per grant in scenario 2")
    parser.add_argument("--rate-threads", type=int, default=2000)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-default-mailbox", action="store_true")
    parser.add_argument("--skip-default-pacing", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--skip-pacing", action="store_true")
    args = parser.parse_args()
    (ROOT / ".nova").mkdir(exist_ok=True)
    server_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if not args.skip_throughput:
        throughput(server_url, args)
    if not args.skip_default_mailbox:
        default_mailbox(server_url, args)
    if not args.skip_default_pacing:
        default_pacing(server_url, args)
    if not args.skip_sizes:
        mailbox_sizes(server_url, args)
    if not args.skip_pacing:
        pacing(server_url, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
