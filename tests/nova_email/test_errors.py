"""The service's and the Nylas client's errors survive pickling, keyword-only attributes included (``status``,
``retry_after_ms``): a handler in another process still reads them."""

from __future__ import annotations

import types

import pytest

from nova_email import errors
from nova_email.nylas import errors as nylas_errors
from tests.pickling import assert_unpickles_unchanged

HTTP = {"request_id": "req-1", "grant_id": "grant-1", "object_id": "thread-1", "endpoint": "threads.get"}

#: One instance of each error of each module, with the keyword-only arguments its class takes.
INSTANCES: dict[types.ModuleType, list[Exception]] = {
    errors: [
        errors.NovaError("The service failed"),
        errors.ConfigError("NOVA_DATABASE_URL is missing"),
        errors.DatabaseError("No database could be reached"),
        errors.InvalidJob("invalid value for type, expected str @ $.grant_id"),
    ],
    nylas_errors: [
        nylas_errors.NylasError("The client failed"),
        nylas_errors.InvalidObjectId("Object id '..' cannot be a URL path segment"),
        nylas_errors.NylasConnectionError("No answer from Nylas", grant_id="grant-1", endpoint="threads.get"),
        nylas_errors.ResponseShapeError("Bad JSON", grant_id="grant-1", details=["expected int @ $.data[3].date"]),
        nylas_errors.NylasHTTPError("Nylas answered 418", status=418, error_type="teapot", provider_error={}, **HTTP),
        nylas_errors.BadRequest("Nylas answered 400", status=400, **HTTP),
        nylas_errors.InvalidApiKey("Nylas refused the API key", status=401, error_type="token.unauthorized_access"),
        nylas_errors.GrantExpired("The grant is expired", status=401, **HTTP),
        nylas_errors.NotFound("The thread is gone", status=404, **HTTP),
        nylas_errors.RateLimited("Too many requests", retry_after_ms=2_000, retry_after_given=False, **HTTP),
        nylas_errors.PacingLimitReached("The pacer would wait too long", retry_after_ms=1_500, grant_id="grant-1"),
        nylas_errors.ServerError("Nylas answered 503", status=503, **HTTP),
    ],
}


@pytest.mark.parametrize("module", INSTANCES, ids=lambda module: module.__name__)
def test_every_error_of_each_module_is_checked(module: types.ModuleType) -> None:
    assert sorted(type(exc).__name__ for exc in INSTANCES[module]) == sorted(module.__all__)


@pytest.mark.parametrize(
    "exc", [exc for instances in INSTANCES.values() for exc in instances], ids=lambda exc: type(exc).__name__
)
def test_an_error_unpickles_with_its_message_and_attributes(exc: Exception) -> None:
    assert_unpickles_unchanged(exc)
