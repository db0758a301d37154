"""The Nylas client's errors survive pickling: Dramatiq's result backends and multiprocessing send them across
processes, and a handler there still reads their attributes (``status``, ``retry_after_ms``)."""

from __future__ import annotations

import pickle

import pytest

from nova_email.nylas import errors

HTTP = {"request_id": "req-1", "grant_id": "grant-1", "object_id": "thread-1", "endpoint": "threads.get"}

#: One instance of each error of `nova_email.nylas.errors`, with the keyword-only arguments its class takes.
INSTANCES = [
    errors.NylasError("The client failed"),
    errors.InvalidObjectId("Object id '..' cannot be a URL path segment"),
    errors.NylasConnectionError("No answer from Nylas", grant_id="grant-1", endpoint="threads.get"),
    errors.ResponseShapeError("Bad JSON", grant_id="grant-1", details=["expected int @ $.data[3].date"]),
    errors.NylasHTTPError("Nylas answered 418", status=418, error_type="teapot", provider_error={"code": 7}, **HTTP),
    errors.BadRequest("Nylas answered 400", status=400, **HTTP),
    errors.InvalidApiKey("Nylas refused the API key", status=401, error_type="token.unauthorized_access"),
    errors.GrantExpired("The grant is expired", status=401, **HTTP),
    errors.NotFound("The thread is gone", status=404, **HTTP),
    errors.RateLimited("Too many requests", retry_after_ms=2_000, retry_after_given=False, **HTTP),
    errors.PacingLimitReached("The pacer would wait too long", retry_after_ms=1_500, grant_id="grant-1"),
    errors.ServerError("Nylas answered 503", status=503, **HTTP),
]


def test_every_error_of_the_module_is_checked() -> None:
    assert sorted(type(exc).__name__ for exc in INSTANCES) == sorted(errors.__all__)


@pytest.mark.parametrize("exc", INSTANCES, ids=lambda exc: type(exc).__name__)
def test_an_error_unpickles_with_its_message_and_attributes(exc: errors.NylasError) -> None:
    copy = pickle.loads(pickle.dumps(exc))

    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert copy.args == exc.args
    assert vars(copy) == vars(exc)
