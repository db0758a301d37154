"""``python -m nova_email.serve_webhooks``: the webhook receiver's process, which ``nova-email serve-webhooks`` runs.

The receiver's workers are gevent workers, and gevent must patch the standard library before psycopg and
psycopg_pool are imported: they bind ``select``, ``selectors``, ``threading``'s locks and ``time.sleep`` when they are
imported, and bound to the blocking versions, one request waiting on Postgres (or for a pooled connection) would
stall every other connection of its worker. So this module patches first and imports the service afterwards, in a
process of its own. The gunicorn master keeps its own signals, ``os`` and ``subprocess``; the workers patch those
too, as gunicorn's gevent worker always does.
"""

# ruff: noqa: E402  (the patch must come before every other import)
from gevent import monkey

monkey.patch_all(os=False, signal=False, subprocess=False)

import argparse
import os
import sys
from collections.abc import Sequence

import psycopg

from nova_email.config import Settings, load_settings
from nova_email.errors import NovaError
from nova_email.log import setup_logging
from nova_email.masking import command_error

__all__ = ["run"]


def run(argv: Sequence[str] | None = None) -> int:
    """Load the settings from the environment, parse the options and serve until stopped.

    The settings come first: gunicorn reads ``WEB_CONCURRENCY`` with ``int()`` when it is imported, so a malformed
    value must be reported as the setting it is (one line) before anything imports gunicorn, and an empty one, which
    is unset for the settings as for every variable, is removed from the environment.
    """
    settings: Settings | None = None
    try:
        settings = load_settings()
        if not os.environ.get("WEB_CONCURRENCY", "unset").strip():
            del os.environ["WEB_CONCURRENCY"]
        from nova_email.intake.server import add_arguments, run_from_arguments

        parser = argparse.ArgumentParser(
            prog="nova-email serve-webhooks", description="Receive Nylas webhooks over HTTP into the webhook queue."
        )
        add_arguments(parser)
        args = parser.parse_args(argv)
        setup_logging(settings)
        return run_from_arguments(settings, args, args.ready_file)
    except (NovaError, psycopg.Error) as exc:
        print(command_error("nova-email serve-webhooks", exc, settings), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
