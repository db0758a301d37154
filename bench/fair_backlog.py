"""Fairness keys cost no more as the backlog grows: a keyed backlog drains nearly as fast as the same one unkeyed.

The same backlog (100,000 no-op messages by default) is drained by ``dramatiq`` (2 processes x 8 threads, the no-op
actor of bench/broker.py), each time in a fresh scratch database: on a plain queue, and on a queue in fairness mode
with the messages spread over 1,000 keys, in the order plain, keyed, keyed, plain (so that a load drifting during the
run favours neither). Prints the drain rates and the ratio of their means (target: >= 0.8),
plus the enqueue rates (the keyed queue maintains its key table on insert). The order itself is checked by the
tests (tests/brokers/test_fairness.py).

Usage:
    .venv/bin/python bench/fair_backlog.py [--messages 100000] [--keys 1000] [--processes 2] [--threads 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dramatiq import Message

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.broker import NOOP_QUEUE, pgmq_depth, rate, scratch_database, timed, workers  # noqa: E402
from brokers import PGMQBroker  # noqa: E402
from brokers.fairness import FAIRNESS_KEY_OPTION, enable_fairness  # noqa: E402


def keyed_message(n: int, keys: int) -> Message[Any]:
    options = {FAIRNESS_KEY_OPTION: f"tenant-{n % keys}"} if keys else {}
    return Message(queue_name=NOOP_QUEUE, actor_name="noop", args=(n,), kwargs={}, options=options)


def drain(n: int, keys: int, processes: int, threads: int) -> tuple[float, float]:
    """(enqueue rate, drain rate) of `n` messages over `keys` keys (0: a plain queue)."""
    with scratch_database() as url:
        broker = PGMQBroker(url=url)
        broker.enable_notify(NOOP_QUEUE)
        if keys:
            with broker.pool.connection() as conn:
                enable_fairness(conn, NOOP_QUEUE)
        messages = [keyed_message(i, keys) for i in range(n)]
        enqueue_s = timed(lambda: broker.enqueue_many(messages))
        depth = pgmq_depth(url)
        assert depth() == n
        samples: list[tuple[float, int]] = []
        with workers("pgmq", url, NOOP_QUEUE, processes, threads):
            started = time.perf_counter()
            while time.perf_counter() < started + 900:
                current = depth()
                samples.append((time.perf_counter() - started, current))
                if current == 0:
                    break
                time.sleep(0.1)
        broker.close()
    if samples[-1][1] != 0:
        raise RuntimeError(f"{samples[-1][1]} messages left after 900 s")
    # From the first sample that saw the queue shrink to the one that saw it empty (worker start-up excluded).
    first_drop, start_depth = next(((t, d) for t, d in samples if d < n), samples[-1])
    return rate(n, enqueue_s), rate(start_depth, samples[-1][0] - first_drop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, choices=(1, 2), default=2, help="2: plain, keyed, keyed, plain")
    args = parser.parse_args()

    # In the order plain, keyed, keyed, plain: a machine whose load drifts during the run favours neither.
    runs: dict[int, list[tuple[float, float]]] = {0: [], args.keys: []}
    for keys in (0, args.keys, args.keys, 0)[: 2 * args.rounds]:
        runs[keys].append(drain(args.messages, keys, args.processes, args.threads))
    print(
        f"Fair backlog benchmark: {args.messages} messages, dramatiq {args.processes} processes x {args.threads} threads"
    )
    for keys, label in ((0, "plain queue"), (args.keys, f"{args.keys} keys")):
        rates = ", ".join(f"enqueue {e:6.0f} / drain {d:6.0f}" for e, d in runs[keys])
        print(f"  {label:12s} msgs/s: {rates}")
    plain_enqueue, plain_drain = (statistics.fmean(r[i] for r in runs[0]) for i in (0, 1))
    keyed_enqueue, keyed_drain = (statistics.fmean(r[i] for r in runs[args.keys]) for i in (0, 1))
    print(f"  keyed / plain  enqueue {keyed_enqueue / plain_enqueue:5.2f} x, drain {keyed_drain / plain_drain:5.2f} x")


if __name__ == "__main__":
    main()
