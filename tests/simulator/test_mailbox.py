"""The generated mailbox: deterministic from its seed, realistic in spread, and exported as ground truth."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import requests

from nova_email.simulator import Simulator, SimulatorHandle, export_grant, write_exports
from nova_email.simulator.mailbox import DAY_S, generate_grant
from tests.simulator.conftest import ANCHOR


def test_the_same_seed_gives_the_same_mailbox_and_another_seed_another() -> None:
    first = Simulator(seed=11, grants=["g"], threads_per_grant=40, anchor=ANCHOR)
    again = Simulator(seed=11, grants=["g"], threads_per_grant=40, anchor=ANCHOR)
    other = Simulator(seed=12, grants=["g"], threads_per_grant=40, anchor=ANCHOR)

    assert export_grant(first, "g") == export_grant(again, "g")
    assert export_grant(first, "g")["messages"] != export_grant(other, "g")["messages"]


def test_a_large_mailbox_is_realistic() -> None:
    grant = generate_grant(seed=5, grant_id="big", threads=2_000, anchor=ANCHOR)
    messages = list(grant.messages.values())
    sizes = Counter(len(t.messages) for t in grant.threads.values())
    latest = [t.latest_received for t in grant.threads.values()]

    # Messages per thread: mostly short threads, a long tail past 50.
    assert sizes[1] > 400 and max(sizes) >= 50
    assert 4.5 <= len(messages) / len(grant.threads) <= 7.5
    # Dates spread over more than a year, so the one-year cut drops real threads.
    assert all(d is not None for d in latest)
    old = sum(1 for d in latest if d is not None and d < ANCHOR - 365 * DAY_S)
    assert 0.2 < old / len(latest) < 0.5
    # Flags, folders, attachments, unicode, large bodies.
    assert 0 < sum(m.unread for m in messages) < len(messages) / 2
    assert 0 < sum(m.starred for m in messages) < len(messages) / 10
    assert {"INBOX", "SENT", "UNREAD"} <= {f for m in messages for f in m.folders}
    assert sum(1 for m in messages if m.attachments) > len(messages) / 20
    assert any(not m.subject.isascii() for m in messages)
    assert any(not name.isascii() for m in messages for name, _ in m.from_)
    assert sum(1 for m in messages if m.body_size >= 100_000) > 50


@pytest.mark.slow
def test_the_benchmark_mailbox_of_ten_thousand_threads_can_be_generated() -> None:
    # About 0.4 s on an idle machine; the speed target itself belongs to bench/.
    grant = generate_grant(seed=1, grant_id="bench", threads=10_000, anchor=ANCHOR)

    assert len(grant.threads) == 10_000 and len(grant.messages) > 50_000


def test_bodies_are_regenerated_identically_and_snippets_match_them() -> None:
    grant = generate_grant(seed=3, grant_id="g", threads=30, anchor=ANCHOR)

    for message in list(grant.messages.values())[:50]:
        opening, body = message.opening_and_body()
        assert message.opening_and_body() == (opening, body)
        assert body.startswith(f"<div><p>{opening}")
        assert message.snippet() == opening[:100]


def test_the_export_is_what_the_api_serves(sim: SimulatorHandle, http: requests.Session) -> None:
    truth = sim.export("grant-a")
    thread_id = truth["threads"][0]["id"]

    served = http.get(f"{sim.base_url}/v3/grants/grant-a/threads/{thread_id}").json()["data"]
    message = http.get(f"{sim.base_url}/v3/grants/grant-a/messages/{served['message_ids'][0]}").json()["data"]

    exported_thread = truth["threads"][0]
    assert exported_thread["latest_message_id"] == served["latest_draft_or_message"]["id"]
    assert {k: v for k, v in served.items() if k != "latest_draft_or_message"} == {
        k: v for k, v in exported_thread.items() if k != "latest_message_id"
    }
    assert message in truth["messages"]
    assert len(truth["messages"]) == sum(len(t["message_ids"]) for t in truth["threads"])
    assert truth["grant_id"] == "grant-a" and truth["status"] == "valid" and truth["anchor"] == ANCHOR


def test_the_export_is_served_over_the_control_api_and_written_to_files(sim: SimulatorHandle, tmp_path: Path) -> None:
    over_http = requests.get(f"{sim.base_url}/_sim/grants/grant-b/export", params={"bodies": "0"}).json()
    paths = write_exports(sim.simulator, tmp_path, with_bodies=False)

    assert over_http == sim.export("grant-b", with_bodies=False)
    assert all("body" not in m for m in over_http["messages"])
    assert [p.name for p in paths] == ["grant-a.json", "grant-b.json"]
    assert json.loads(paths[1].read_text()) == over_http
