"""Drain a 100,000-message backlog with the PGMQ broker on default Postgres settings.

dramatiq-pg fails outright on a 20k backlog at default settings; this checks that a large backlog is neither
a problem to enqueue (batched, ``enqueue_many``) nor to drain (``dramatiq`` with 2 processes x 8 threads on
the no-op actor of bench/broker.py), and reports both rates and the drain rate over time.

Usage:
    .venv/bin/python bench/backlog.py [--messages 100000] [--processes 2] [--threads 8]

The database is a scratch one on BENCH_DATABASE_URL's server (default: the local PostgreSQL), dropped at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.broker import NOOP_QUEUE, message, pgmq_depth, rate, scratch_database, timed, workers  # noqa: E402
from brokers import PGMQBroker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    n = args.messages

    with scratch_database() as url:
        broker = PGMQBroker(url=url)
        broker.enable_notify(NOOP_QUEUE)
        messages = [message(i) for i in range(n)]
        enqueue_s = timed(lambda: broker.enqueue_many(messages))
        depth = pgmq_depth(url)
        assert depth() == n

        samples: list[tuple[float, int]] = []
        with workers("pgmq", url, NOOP_QUEUE, args.processes, args.threads):
            started = time.perf_counter()
            deadline = started + 600
            while time.perf_counter() < deadline:
                current = depth()
                samples.append((time.perf_counter() - started, current))
                if current == 0:
                    break
                time.sleep(0.1)
        dead = broker.count_dead_letters()
        broker.close()

    # Rates run from the first sample that saw the queue shrink (and its depth) to the sample that saw it empty.
    first_drop, start_depth = next(((t, d) for t, d in samples if d < n), samples[-1])
    total_s = samples[-1][0]
    print(f"Backlog benchmark: {n} messages, dramatiq {args.processes} processes x {args.threads} threads")
    print(f"  enqueue_many                 {rate(n, enqueue_s):10.0f} msgs/s ({enqueue_s:.1f} s)")
    print(
        f"  drained in                   {total_s - first_drop:10.1f} s after the first message (workers start-up excluded)"
    )
    print(f"  drain rate                   {rate(start_depth, total_s - first_drop):10.0f} msgs/s")
    print(f"  left in the queue            {samples[-1][1]:10d}")
    print(f"  dead-lettered                {dead:10d}")
    for fraction in (0.25, 0.5, 0.75):
        target = n * (1 - fraction)
        at = next((t for t, d in samples if d <= target), None)
        if at is not None:
            print(f"  {int(fraction * 100):3d}% drained at              {at - first_drop:10.1f} s")


if __name__ == "__main__":
    main()
