"""Benchmark of what an unauthenticated gzip body costs the webhook intake, against a plain body of the same size.

A stranger's POST is refused (401) without being stored, but the server still does some work before it knows the
signature is wrong. This prints the server's CPU time per refused request for three bodies of the same size on the
wire, and the ratio of each to the plain one (the peer):
    plain      4 KB of JSON, no Content-Encoding
    gzip-json  4 KB of gzip that inflates about 6x (a realistic compressed delivery)
    gzip-bomb  4 KB of gzip that would inflate to 4 MiB

Usage:
    .venv/bin/python bench/intake_gzip.py [--requests 400]

The CPU time is the worker process's (user + system), read with psutil before and after each scenario; the database
is a scratch one on BENCH_DATABASE_URL's server (default: the local PostgreSQL at 127.0.0.1:5432), dropped at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import string
import tempfile
from pathlib import Path

import psutil
import psycopg
import requests

from nova_email.config import Settings
from nova_email.db import with_database
from nova_email.intake import RunningIntake, serve_in_background
from nova_email.migrate import migrate

SECRET = "g21p" * 16
BODY_BYTES = 4096


def bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    """The three bodies, each about BODY_BYTES on the wire, with their headers (and a wrong signature)."""
    rng = random.Random(7)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(300)]
    text = " ".join(rng.choices(words, k=6000))
    plain = json.dumps({"id": "x", "type": "message.created", "data": {"body": text}}).encode()[:BODY_BYTES]
    document = gzip.compress(json.dumps({"data": {"body": text}}).encode())[:BODY_BYTES]
    bomb = gzip.compress(b" " * (4 * 1024 * 1024), compresslevel=9)
    bomb += b"\0" * max(0, BODY_BYTES - len(bomb))  # padding after the gzip member, to the same size on the wire
    wrong = {"X-Nylas-Signature": "0" * 64, "Content-Type": "application/json"}
    return {
        "plain": (plain, wrong),
        "gzip-json": (document, {**wrong, "Content-Encoding": "gzip"}),
        "gzip-bomb": (bomb[: max(len(bomb), BODY_BYTES)], {**wrong, "Content-Encoding": "gzip"}),
    }


def worker_cpu_s(server: RunningIntake) -> float:
    """CPU seconds used so far by the server's worker processes."""
    total = 0.0
    for child in psutil.Process(server.pid).children(recursive=True):
        times = child.cpu_times()
        total += times.user + times.system
    return total


def run(server: RunningIntake, count: int) -> dict[str, float]:
    per_request = {}
    with requests.Session() as http:
        for name, (body, headers) in bodies().items():
            for _ in range(20):  # warm-up
                http.post(server.webhook_url, data=body, headers=headers, timeout=10)
            before = worker_cpu_s(server)
            statuses = {
                http.post(server.webhook_url, data=body, headers=headers, timeout=10).status_code for _ in range(count)
            }
            per_request[name] = (worker_cpu_s(server) - before) / count
            print(f"{name:10} {len(body):5} bytes  status {sorted(statuses)}  {per_request[name] * 1e6:8.0f} µs CPU/request",
                  flush=True)  # fmt: skip
    return per_request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per scenario")
    args = parser.parse_args()
    admin_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"gzip_bench_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    url = with_database(admin_url, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn, tempfile.TemporaryDirectory() as scratch:
            migrate(conn)
            settings = Settings(
                database_url=url, nylas_webhook_secret=SECRET, data_dir=Path(scratch), log_level="error"
            )
            with serve_in_background(settings, workers=1) as server:
                cost = run(server, args.requests)
        for scenario in ("gzip-json", "gzip-bomb"):
            print(f"{scenario}: {cost[scenario] / cost['plain']:.1f}x the CPU of a plain body of the same size")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
