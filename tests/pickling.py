"""Errors cross processes pickled (Dramatiq's result backends, multiprocessing) and must arrive unchanged."""

from __future__ import annotations

import pickle


def assert_unpickles_unchanged(exc: BaseException) -> None:
    """`exc` pickled and unpickled is the same error: class, message, args and attributes."""
    copy = pickle.loads(pickle.dumps(exc))
    assert (type(copy), str(copy), copy.args, vars(copy)) == (type(exc), str(exc), exc.args, vars(exc))
