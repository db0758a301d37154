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
from .server import add_arguments, run_from_arguments


def run(argv: Sequence[str] | None = None) -> int:
    """Parse the options, load the settings from the environment and serve until stopped."""
    parser = argparse.ArgumentParser(prog="python -m nova_email.intake", description=__doc__)
    add_arguments(parser)
    parser.add_argument(
        "--ready-file", type=Path, default=None, help='write "<host> <port> <metrics port or ->" here once listening'
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings)
        return run_from_arguments(settings, args, args.ready_file)
    except NovaError as exc:
        print(f"nova-email intake: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
