"""The real client against the running simulator, with faults on."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from nova_email.nylas import (
    ApiCallCounter,
    GrantExpired,
    Message,
    NotFound,
    NylasClient,
    NylasConnectionError,
    Pacer,
    RateLimited,
    ServerError,
    Thread,
    build_session,
)
from nova_email.nylas.client import DEFAULT_RATE_LIMIT_DELAY_MS
from nova_email.nylas.models import to_json
from nova_email.simulator import SimulatorHandle
from tests.simulator.conftest import ANCHOR, API_KEY

ANCHOR_DT = datetime.fromtimestamp(ANCHOR, tz=UTC)


@pytest.fixture
def counter() -> ApiCallCounter:
    return ApiCallCounter()


def make_client(sim: SimulatorHandle, counter: ApiCallCounter, *, retries: int = 3, **kwargs: Any) -> NylasClient:
    session = build_session(max_retries=retries, counter=counter, backoff_factor_s=0.001, backoff_jitter_s=0.001)
    return NylasClient(api_key=API_KEY, api_uri=sim.base_url, session=session, counter=counter, **kwargs)


@pytest.fixture
def client(sim: SimulatorHandle, counter: ApiCallCounter) -> Iterator[NylasClient]:
    c = make_client(sim, counter)
    yield c
    c.close()


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def threads_in_last_year(sim: SimulatorHandle, grant: str) -> set[str]:
    cut = ANCHOR - 365 * 86_400
    return {
        t["id"] for t in sim.export(grant, with_bodies=False)["threads"] if t["latest_message_received_date"] >= cut
    }


def test_a_one_year_backfill_lists_exactly_the_threads_of_the_last_year(
    sim: SimulatorHandle, client: NylasClient
) -> None:
    pages = list(
        client.iter_threads(
            "grant-a",
            latest_message_after=ANCHOR_DT - timedelta(days=800),
            latest_message_before=ANCHOR_DT,
            limit=9,
        )
    )

    listed = [t.id for p in pages for t in p.threads]
    assert len(listed) == len(set(listed))
    assert set(listed) == threads_in_last_year(sim, "grant-a")
    assert 0 < len(listed) < len(sim.simulator.grants["grant-a"].threads)  # the one-year cut dropped some
    assert all(p.next_cursor for p in pages[:-1]) and pages[-1].next_cursor is None


def test_every_simulated_object_structures_into_the_models(sim: SimulatorHandle, client: NylasClient) -> None:
    truth = sim.export("grant-a")
    by_id = {m["id"]: m for m in truth["messages"]}
    longest = max(truth["threads"], key=lambda t: len(t["message_ids"]))

    thread = client.get_thread("grant-a", longest["id"])
    messages = list(client.iter_thread_messages("grant-a", longest["id"], limit=3))

    assert isinstance(thread, Thread) and thread.message_ids == tuple(longest["message_ids"])
    assert {m.id for m in messages} == set(longest["message_ids"])
    for message in messages:
        assert isinstance(message, Message)
        assert without_nulls(to_json(message)) == without_nulls(by_id[message.id] | {"headers": []})


def test_transient_faults_are_absorbed_and_counted(sim: SimulatorHandle, counter: ApiCallCounter) -> None:
    # Given a simulator that fails a fifth of requests and resets a tenth of connections
    sim.faults.error_rate = 0.2
    sim.faults.reset_rate = 0.1
    sim.faults.seed = 3
    client = make_client(sim, counter, retries=10)

    # When the client lists every thread and reads messages
    pages = list(
        client.iter_threads(
            "grant-b", latest_message_after=ANCHOR_DT - timedelta(days=365), latest_message_before=ANCHOR_DT, limit=5
        )
    )
    listed = {t.id for p in pages for t in p.threads}
    threads = [client.get_thread("grant-b", t) for t in sorted(listed)[:5]]
    some_messages = [client.get_message("grant-b", t.message_ids[0]) for t in threads]

    # Then nothing is lost, and the retries show in the counts
    assert listed == threads_in_last_year(sim, "grant-b")
    assert len(some_messages) == 5
    calls = counter.snapshot()
    failures = sum(n for (_, status), n in calls.items() if status != 200)
    assert failures > 0
    assert calls[("threads.list", 200)] == len(pages)
    assert counter.total() == sim.simulator.calls.total()  # both sides saw the same attempts


def test_persistent_faults_surface_as_typed_errors(sim: SimulatorHandle, counter: ApiCallCounter) -> None:
    client = make_client(sim, counter, retries=2)
    thread_id = next(iter(sim.simulator.grants["grant-a"].threads))

    sim.faults.error_rate = 1.0
    with pytest.raises(ServerError) as server_error:
        client.get_thread("grant-a", thread_id)
    sim.faults.error_rate = 0.0
    sim.faults.reset_rate = 1.0
    with pytest.raises(NylasConnectionError):
        client.get_thread("grant-a", thread_id)

    assert server_error.value.status in {500, 502, 503, 504} and server_error.value.object_id == thread_id
    assert counter.total(endpoint="threads.get") == 6  # 3 attempts each


def test_rate_limits_raise_rate_limited_with_the_servers_delay(
    sim: SimulatorHandle, client: NylasClient, counter: ApiCallCounter
) -> None:
    thread_id = next(iter(sim.simulator.grants["grant-a"].threads))
    sim.faults.rate_limit_per_s = 1

    client.get_thread("grant-a", thread_id)
    with pytest.raises(RateLimited) as with_header:
        client.get_thread("grant-a", thread_id)
    sim.faults.retry_after = False
    with pytest.raises(RateLimited) as without_header:
        client.get_thread("grant-a", thread_id)

    assert with_header.value.retry_after_ms == 1000 and with_header.value.retry_after_given
    assert without_header.value.retry_after_ms == DEFAULT_RATE_LIMIT_DELAY_MS
    assert not without_header.value.retry_after_given
    assert counter.snapshot()[("threads.get", 429)] == 2  # never retried inside the call


def test_an_expired_grant_and_a_vanished_message_raise_their_errors(sim: SimulatorHandle, client: NylasClient) -> None:
    message_id = next(iter(sim.simulator.grants["grant-a"].messages))
    sim.faults.vanish_rate = 1.0
    sim.simulator.expire_grant("grant-b")

    with pytest.raises(NotFound) as gone:
        client.get_message("grant-a", message_id)
    with pytest.raises(GrantExpired) as expired:
        list(client.iter_threads("grant-b", latest_message_after=ANCHOR_DT - timedelta(days=30)))

    assert gone.value.object_id == message_id and gone.value.error_type == "not_found_error"
    assert expired.value.grant_id == "grant-b" and expired.value.status == 401


def test_a_mailbox_changing_mid_listing_still_lists_every_thread_that_did_not_move_up(
    sim: SimulatorHandle, client: NylasClient
) -> None:
    # Given a mailbox where a thread gains a message before every page after the first
    sim.faults.changing_pages_rate = 1.0
    before = threads_in_last_year(sim, "grant-a")

    pages = list(
        client.iter_threads(
            "grant-a", latest_message_after=ANCHOR_DT - timedelta(days=365), latest_message_before=ANCHOR_DT, limit=6
        )
    )

    # Then threads may repeat (offset cursors shift), and each miss is a thread that moved up: announced by webhook
    listed = {t.id for p in pages for t in p.threads}
    announced = {n.payload["data"]["object"]["thread_id"] for n in sim.simulator.emitted if n.type == "message.created"}
    assert len(pages) > 2 and announced
    assert before - listed <= announced


def test_a_paced_client_stays_under_the_simulators_rate_limit(
    sim: SimulatorHandle, counter: ApiCallCounter, db_url: str
) -> None:
    # Given a simulator that allows 20 calls/s per grant in bursts of 5, and a client paced at 15/s in bursts of 3
    # (the smaller burst leaves room for requests that reach the server later than their slot and arrive together)
    sim.faults.rate_limit_per_s = 20
    sim.faults.rate_limit_burst = 5
    with ConnectionPool(db_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True) as pool:
        client = make_client(sim, counter, pacer=Pacer(pool.connection, grant_rate_per_s=15, grant_burst=3))
        thread_ids = list(sim.simulator.grants["grant-a"].threads)[:30]

        # When it fetches 30 threads as fast as it may
        threads = [client.get_thread("grant-a", t) for t in thread_ids]

    # Then no call was rate-limited
    assert len(threads) == 30
    assert counter.snapshot() == {("threads.get", 200): 30}
