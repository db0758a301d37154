"""``python -m nova_email.intake``: the intake server with its options on the command line.

``nova-email serve-webhooks`` is the usual way in; this entry exists so that `serve_in_background` (and an
operator who wants to tune workers, threads or the body limit) can start the same server directly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import load_settings
from ..errors import NovaError
from ..log import setup_logging
from .app import DEFAULT_MAX_BODY_BYTES, DEFAULT_POOL_TIMEOUT_S
from .server import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_THREADS, DEFAULT_WORKERS, main


def run(argv: Sequence[str] | None = None) -> int:
    """Parse the options, load the settings from the environment and serve until stopped."""
    parser = argparse.ArgumentParser(prog="python -m nova_email.intake", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="worker processes")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="threads per worker")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--pool-timeout-s", type=float, default=DEFAULT_POOL_TIMEOUT_S)
    parser.add_argument("--ready-file", type=Path, default=None, help='write "<host> <port>" here once listening')
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings)
        return main(
            settings,
            args.host,
            args.port,
            workers=args.workers,
            threads=args.threads,
            max_body_bytes=args.max_body_bytes,
            pool_timeout_s=args.pool_timeout_s,
            ready_file=args.ready_file,
        )
    except NovaError as exc:
        print(f"nova-email intake: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
