"""Each fault flag changes what a plain HTTP client sees, as real Nylas faults would."""

from __future__ import annotations

import time

import pytest
import requests

from nova_email.simulator import SimulatorHandle


def threads_url(sim: SimulatorHandle, grant: str = "grant-a") -> str:
    return f"{sim.base_url}/v3/grants/{grant}/threads"


def test_a_grant_over_its_rate_gets_429_with_retry_after_in_seconds(
    sim: SimulatorHandle, http: requests.Session
) -> None:
    sim.faults.rate_limit_per_s = 2
    sim.faults.rate_limit_burst = 2

    statuses = [http.get(threads_url(sim), params={"limit": 1}) for _ in range(4)]
    other_grant = http.get(threads_url(sim, "grant-b"), params={"limit": 1})

    assert [r.status_code for r in statuses] == [200, 200, 429, 429]
    limited = statuses[2]
    assert limited.json()["error"]["type"] == "nylas_rate_limit_exceeded"
    assert limited.headers["Retry-After"] == "1"
    assert other_grant.status_code == 200  # the budget is per grant


def test_429s_can_come_without_retry_after(sim: SimulatorHandle, http: requests.Session) -> None:
    sim.faults.rate_limit_per_s = 0.5
    sim.faults.retry_after = False

    http.get(threads_url(sim), params={"limit": 1})
    limited = http.get(threads_url(sim), params={"limit": 1})

    assert limited.status_code == 429 and "Retry-After" not in limited.headers


def test_error_rate_answers_5xx_with_the_error_envelope(sim: SimulatorHandle, http: requests.Session) -> None:
    sim.faults.error_rate = 1.0

    responses = [http.get(threads_url(sim)) for _ in range(8)]

    assert {r.status_code for r in responses} <= {500, 502, 503, 504}
    assert all(r.json()["error"]["type"] in {"internal_error", "provider_error"} for r in responses)
    assert sum(n for (_, status), n in sim.simulator.calls.snapshot().items() if status >= 500) == 8


def test_error_statuses_choose_what_error_rate_answers(sim: SimulatorHandle, http: requests.Session) -> None:
    # A 501 is a server error the service's client does not retry inside a call; over the control API too
    http.post(f"{sim.base_url}/_sim/faults", json={"error_rate": 1.0, "error_statuses": [501]})

    responses = [http.get(threads_url(sim)) for _ in range(4)]

    assert [r.status_code for r in responses] == [501] * 4
    assert all(r.json()["error"]["type"] == "provider_error" for r in responses)


def test_reset_rate_drops_connections_without_an_answer(sim: SimulatorHandle, http: requests.Session) -> None:
    sim.faults.reset_rate = 1.0

    with pytest.raises(requests.ConnectionError):
        http.get(threads_url(sim))

    sim.faults.reset_rate = 0.0
    assert http.get(threads_url(sim)).status_code == 200  # the server itself is fine


def test_latency_delays_every_api_answer(sim: SimulatorHandle, http: requests.Session) -> None:
    sim.faults.latency_ms = 150

    started = time.monotonic()
    http.get(threads_url(sim), params={"limit": 1})

    assert time.monotonic() - started >= 0.15


def test_unordered_threads_lists_the_same_threads_in_another_order(
    sim: SimulatorHandle, http: requests.Session
) -> None:
    params = {"limit": "200", "select": "id"}
    ordered = [t["id"] for t in http.get(threads_url(sim), params=params).json()["data"]]
    sim.faults.unordered_threads = True
    shuffled = [t["id"] for t in http.get(threads_url(sim), params=params).json()["data"]]

    assert sorted(ordered) == sorted(shuffled) and ordered != shuffled


def test_changing_pages_grows_a_thread_between_pages_and_announces_it(
    sim: SimulatorHandle, http: requests.Session
) -> None:
    sim.faults.changing_pages_rate = 1.0
    before = sum(len(t.messages) for t in sim.simulator.grants["grant-a"].threads.values())

    first = http.get(threads_url(sim), params={"limit": 10}).json()
    http.get(threads_url(sim), params={"limit": 10, "page_token": first["next_cursor"]})

    after = sum(len(t.messages) for t in sim.simulator.grants["grant-a"].threads.values())
    assert after == before + 1  # only pages after the first change the mailbox
    assert "message.created" in [n.type for n in sim.simulator.emitted]


def test_vanish_rate_deletes_a_message_between_list_and_get(sim: SimulatorHandle, http: requests.Session) -> None:
    message_id = http.get(f"{sim.base_url}/v3/grants/grant-a/messages", params={"limit": 1}).json()["data"][0]["id"]
    sim.faults.vanish_rate = 1.0

    gone = http.get(f"{sim.base_url}/v3/grants/grant-a/messages/{message_id}")

    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    assert message_id not in sim.simulator.grants["grant-a"].messages


def test_faults_spare_the_control_api(sim: SimulatorHandle) -> None:
    sim.faults.error_rate = 1.0
    sim.faults.reset_rate = 1.0

    health = requests.get(f"{sim.base_url}/_sim/health")

    assert health.json() == {"status": "ok", "grants": 2}
