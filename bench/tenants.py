"""Many inboxes at once: how fairly and how fully the service uses what each grant allows.

Every backfill is queued at once (through ``queue_inbox_backfill``, as other services do), and then one small inbox
(a 30-day window) right after them. ``dramatiq nova_email.actors`` runs with 2 processes x 8 threads, paced at
NYLAS_GRANT_RATE per grant, against a simulator that allows each grant a little more (so a 429 would be our own
pacing's fault). Printed, from one run:

    wall        from the first backfill queued to the last thread synced
    ideal       a lower bound on the wall time, the larger of two: what the rate allows the busiest grant (its calls
                after the burst / NYLAS_GRANT_RATE: grants are independent, and a rested grant's first
                NYLAS_GRANT_BURST calls go at once), and what this machine allows: the wall time of the very same
                work (the same inboxes, windows and queueing order) with pacing off and a simulator without limits,
                measured after the paced run in the same invocation, warm. Pacing only adds waits, so the paced run cannot beat it; a
                result above 100 % means the unpaced measurement came out slower (noise, or a busier machine), and is printed as
                such.
    efficiency  ideal / wall
    per inbox   time to its first synced thread and to its last (p50 and max), from its backfill being queued
    small inbox queued after the big ones: its completion time, and whether it finished before any big one did
    calls/s     Nylas calls answered, all grants together; 429s answered
    connections the peak number of database connections each worker process held

Calls per grant are counted by a small HTTP proxy in front of the simulator (its own process).

Usage:
    .venv/bin/python bench/tenants.py [--inboxes 20] [--threads 60] [--processes 2] [--worker-threads 8] [--rate 10]

The database is a scratch one on BENCH_DATABASE_URL's server (default: the local PostgreSQL at 127.0.0.1:5432),
migrated with nova_email.migrate and dropped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.backfill import DAY_S, free_port, sim_get  # noqa: E402
from bench.processes import stop_groups, worker_processes  # noqa: E402
from nova_email.db import with_database  # noqa: E402
from nova_email.migrate import migrate  # noqa: E402
from nova_email.simulator.server import SimulatorServer  # noqa: E402

#: The grant in a request path (/v3/grants/<grant>/...).
_GRANT_PATH = re.compile(r"^/v3/grants/([^/?]+)")
#: Days of mail the small inbox's backfill covers (about a sixth of a simulated mailbox's threads).
SMALL_WINDOW_DAYS = 60


# -- the counting proxy (its own process) ------------------------------------------------------------------------


def _serve_proxy(upstream: str, port: int, counts: Any) -> None:
    """Forward every request to `upstream`, counting (grant, status) in the shared dict `counts`."""
    target = urlsplit(upstream)
    local = threading.local()
    lock = threading.Lock()

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as separate writes: without this, Nagle's algorithm holds each body ~40 ms.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            """Quiet."""

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                local.conn = None
                self.send_error(502)
                return
            match = _GRANT_PATH.match(self.path)
            if match:
                key = f"{match[1]} {response.status}"
                with lock:
                    counts[key] = counts.get(key, 0) + 1
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _forward

    class Server(ThreadingHTTPServer):
        # As the simulator's: a burst of connections from the starting workers is not cut at the default 5.
        request_queue_size = SimulatorServer.request_queue_size

    Server(("127.0.0.1", port), Forward).serve_forever()


# -- one run -----------------------------------------------------------------------------------------------------


class Run:
    """A scratch database, a simulator of `grants` grants of `threads` threads, the proxy, and worker processes."""

    def __init__(self, server_url: str, *, grants: int, threads: int, rate: float, args: argparse.Namespace) -> None:
        self.name = f"nova_bench_{secrets.token_hex(3)}"
        self.server_url = server_url
        self.anchor = int(time.time()) // DAY_S * DAY_S
        self.grants = [f"grant-{i}" for i in range(1, grants + 1)]
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'create database "{self.name}"')
        self.url = with_database(server_url, self.name)
        with psycopg.connect(self.url) as conn:
            migrate(conn)
        sim_port, proxy_port = free_port(), free_port()
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        allowed = ["--rate-limit-per-s", f"{rate * 1.1:g}", "--rate-limit-burst", str(int(rate * 1.1))] if rate else []
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "nova_email.cli", "fake-nylas", "--port", str(sim_port), "--grants", str(grants),
             "--threads", str(threads), "--seed", "1", "--anchor", str(self.anchor), "--large-body-share", "0",
             *allowed],  # fmt: skip
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._wait_for(lambda: sim_get(self.sim_url, "/_sim/health"))
        self.manager = multiprocessing.Manager()
        self.counts: Any = self.manager.dict()
        self.proxy = multiprocessing.Process(
            target=_serve_proxy, args=(self.sim_url, proxy_port, self.counts), daemon=True
        )
        self.proxy.start()
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        self._wait_for(lambda: sim_get(proxy_url, "/_sim/health"))
        env = {**os.environ, "DATABASE_URL": self.url, "NYLAS_API_URI": proxy_url, "NYLAS_API_KEY": "bench",
               "COMPLETION_CHECK_INTERVAL_MS": "1000", "LOG_LEVEL": "warning", "THREAD_DELAY_MS": "0",
               "MESSAGE_DELAY_MS": "0", "API_DELAY_MS": "0",
               "NYLAS_GRANT_RATE": f"{rate:g}", "NYLAS_GRANT_BURST": str(grant_burst(rate))}  # fmt: skip
        (ROOT / ".nova").mkdir(exist_ok=True)
        self.log = open(ROOT / ".nova" / "bench-tenants-workers.log", "ab")  # noqa: SIM115
        self.workers = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "nova_email.actors", "--processes", str(args.processes),
             "--threads", str(args.worker_threads)],  # fmt: skip
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.peak_connections: dict[int, int] = {}
        self._wait_for_workers(args.processes)

    def _wait_for_workers(self, processes: int) -> None:
        """Wait until every worker process listens for queue inserts: booted, its consumers running."""
        deadline = time.monotonic() + 120
        with psycopg.connect(self.url, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "select count(*) from pg_stat_activity where datname = current_database() and query ilike 'listen %%'"
                ).fetchone()
                if row is not None and row[0] >= processes:
                    return
                if time.monotonic() > deadline or self.workers.poll() is not None:
                    raise RuntimeError("the worker processes did not start")
                time.sleep(0.1)

    def _wait_for(self, probe: Any) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                probe()
                return
            except OSError:
                if time.monotonic() > deadline or self.sim.poll() is not None:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.2)

    def sample_connections(self) -> None:
        """Each worker process's open connections to PostgreSQL, by its TCP sockets to the server's port."""
        port = urlsplit(self.server_url).port or 5432
        for child in worker_processes(self.workers):
            try:
                held = sum(1 for c in child.net_connections(kind="tcp") if c.raddr and c.raddr.port == port)
            except psutil.Error:
                continue
            self.peak_connections[child.pid] = max(self.peak_connections.get(child.pid, 0), held)

    def backfill_all(self, windows: dict[str, int], timeout_s: float) -> dict[str, dict[str, float]]:
        """Queue one backfill per grant (`windows`: days of mail, in queueing order) and wait for all of them.

        Returns, per grant: seconds from its backfill being queued to its first and its last synced thread.
        """
        end = datetime.fromtimestamp(self.anchor, UTC) + timedelta(days=1)
        configs: dict[str, Any] = {}
        with psycopg.connect(self.url, autocommit=True) as conn:
            inboxes = {
                grant: conn.execute(
                    "insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [grant]
                ).fetchone()[0]  # type: ignore[index]
                for grant in windows
            }
            self.started = time.monotonic()
            for grant, days in windows.items():
                configs[grant] = conn.execute(
                    "select config_id from queue_inbox_backfill(%s, null, %s, %s)",
                    [inboxes[grant], end - timedelta(days=days), end],
                ).fetchone()[0]  # type: ignore[index]
            while True:
                self.sample_connections()
                row = conn.execute(
                    "select count(*) filter (where backfill_status not in ('completed', 'failed'))"
                    " from flux_inbox_configurations where id = any(%s)",
                    [list(configs.values())],
                ).fetchone()
                if row is not None and row[0] == 0:
                    break
                if time.monotonic() - self.started > timeout_s:
                    raise RuntimeError(f"{row[0] if row else '?'} backfills not done after {timeout_s} s")
                time.sleep(0.2)
            # An inbox without threads in its window is done when its backfill is.
            rows = conn.execute(
                "select c.id, extract(epoch from coalesce(min(q.processed_at), c.backfill_completed_at)"
                " - c.backfill_requested_at),"
                " extract(epoch from coalesce(max(q.processed_at), c.backfill_completed_at) - c.backfill_requested_at)"
                " from flux_inbox_configurations c"
                " left join queued_threads q on q.config_id = c.id and q.status = 'completed'"
                " where c.id = any(%s) group by c.id",
                [list(configs.values())],
            ).fetchall()
        by_config = {config_id: (float(first), float(last)) for config_id, first, last in rows}
        return {
            grant: {"first": by_config[config][0], "last": by_config[config][1]} for grant, config in configs.items()
        }

    def calls(self) -> Counter[tuple[str, int]]:
        counted: Counter[tuple[str, int]] = Counter()
        for key, count in dict(self.counts).items():
            grant, status = key.rsplit(" ", 1)
            counted[(grant, int(status))] += count
        return counted

    def close(self) -> None:
        stop_groups(self.workers, self.sim, timeout_s=30)
        self.proxy.terminate()
        self.manager.shutdown()
        self.log.close()
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{self.name}" with (force)')


def grant_burst(rate: float) -> int:
    """NYLAS_GRANT_BURST of the paced run: a second's worth of calls."""
    return max(int(rate), 1)


def tenants_run(
    server_url: str, args: argparse.Namespace, *, rate: float
) -> tuple[dict[str, dict[str, float]], Counter[tuple[str, int]], Run]:
    """The inboxes of one invocation (`--inboxes` big ones, then the small one, queued last), paced at `rate`
    (0: unpaced); per grant its first and last synced thread, the calls counted by the proxy, and the closed run."""
    run = Run(server_url, grants=args.inboxes + 1, threads=args.threads, rate=rate, args=args)
    big, small = run.grants[:-1], run.grants[-1]
    try:
        times = run.backfill_all({**dict.fromkeys(big, 365), small: SMALL_WINDOW_DAYS}, timeout_s=3600)
        calls = run.calls()
    finally:
        run.close()
    return times, calls, run


def unpaced_wall(server_url: str, args: argparse.Namespace) -> float:
    """Seconds this machine takes for the very same work with pacing off: the machine's lower bound."""
    times, _, _ = tenants_run(server_url, args, rate=0)
    return max(t["last"] for t in times.values())


def many_tenants(server_url: str, args: argparse.Namespace) -> None:
    times, calls, run = tenants_run(server_url, args, rate=args.rate)
    # Measured after the paced run, so that it runs warm: any start-up cost falls on the paced run, never on the
    # bound, and the efficiency errs low.
    machine_s = unpaced_wall(server_url, args)
    big, small = run.grants[:-1], run.grants[-1]
    wall = max(t["last"] for t in times.values())
    answered = Counter({grant: n for (grant, status), n in calls.items() if status == 200})
    limited = sum(n for (_, status), n in calls.items() if status == 429)
    busiest = max(answered.values())
    burst = grant_burst(args.rate)
    paced_s = max(busiest - burst, 0) / args.rate
    ideal = max(paced_s, machine_s)
    firsts = [times[g]["first"] for g in big]
    lasts = [times[g]["last"] for g in big]
    small_done = times[small]["last"]
    print(
        f"\nTenants benchmark: {args.inboxes} inboxes x {args.threads} threads (+1 small inbox, {SMALL_WINDOW_DAYS} "
        f"days), {args.processes} processes x {args.worker_threads} threads, NYLAS_GRANT_RATE={args.rate:g}"
    )
    print(f"  wall time                    {wall:8.1f} s (first backfill queued -> last thread synced)")
    print(
        f"  ideal (a lower bound)        {ideal:8.1f} s (the rate: busiest grant ({busiest} calls - burst {burst}) / "
        f"{args.rate:g}/s = {paced_s:.1f} s; the machine: the same work unpaced took {machine_s:.1f} s)"
    )
    efficiency = 100 * ideal / wall
    note = (
        "  (above 100 %: the unpaced run measured slower, noise or a busier machine; run again)"
        if efficiency > 100
        else ""
    )
    print(f"  efficiency (ideal / wall)    {efficiency:8.0f} %{note}")
    print(f"  first synced thread          p50 {statistics.median(firsts):5.1f} s, max {max(firsts):5.1f} s")
    print(f"  inbox completed              p50 {statistics.median(lasts):5.1f} s, max {max(lasts):5.1f} s")
    print(
        f"  small inbox (queued last)    completed after {small_done:.1f} s, before {sum(small_done < t for t in lasts)}"
        f" of the {len(lasts)} big inboxes queued before it"
    )
    print(
        f"  Nylas calls                  {sum(answered.values()) / wall:8.1f} calls/s answered, {limited} answered 429"
    )
    peaks = sorted(run.peak_connections.values(), reverse=True)
    print(f"  database connections         peak per worker process: {', '.join(map(str, peaks)) or 'none seen'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inboxes", type=int, default=20)
    parser.add_argument("--threads", type=int, default=60, help="threads per inbox in the simulator")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=8)
    parser.add_argument("--rate", type=float, default=10.0, help="NYLAS_GRANT_RATE (the simulator allows 10 % more)")
    args = parser.parse_args()
    server_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    many_tenants(server_url, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
