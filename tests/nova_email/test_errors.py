"""The service's errors survive pickling: Dramatiq's result backends and multiprocessing send them across processes."""

from __future__ import annotations

import pickle

import pytest

from nova_email import errors

#: One instance of each error of `nova_email.errors`.
INSTANCES = [
    errors.NovaError("The service failed"),
    errors.ConfigError("NOVA_DATABASE_URL is missing"),
    errors.DatabaseError("No database could be reached"),
    errors.InvalidJob("invalid value for type, expected str @ $.grant_id"),
]


def test_every_error_of_the_module_is_checked() -> None:
    assert sorted(type(exc).__name__ for exc in INSTANCES) == sorted(errors.__all__)


@pytest.mark.parametrize("exc", INSTANCES, ids=lambda exc: type(exc).__name__)
def test_an_error_unpickles_with_its_message_and_attributes(exc: errors.NovaError) -> None:
    copy = pickle.loads(pickle.dumps(exc))

    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert copy.args == exc.args
    assert vars(copy) == vars(exc)
