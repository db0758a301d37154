"""Ground truth: a simulated mailbox as JSON, so tests can compare the database with it field by field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nova_email.simulator.mailbox import message_json, thread_json
from nova_email.simulator.state import Simulator

__all__ = ["export_grant", "write_exports"]


def export_grant(simulator: Simulator, grant_id: str, *, with_bodies: bool = True) -> dict[str, Any]:
    """The grant's state now: ``{grant_id, email, status, anchor, threads: [...], messages: [...]}``.

    Threads and messages have exactly the JSON the API serves (derived thread fields included), sorted by id.
    ``with_bodies=False`` leaves out message bodies, which dominate the size.
    """

    def build() -> dict[str, Any]:
        grant = simulator.grants[grant_id]
        threads = [thread_json(t, with_latest_body=False) for t in grant.threads.values()]
        for thread in threads:
            # The latest message is exported in full under "messages"; here only its id, to keep the file small.
            latest = thread.pop("latest_draft_or_message")
            thread["latest_message_id"] = latest["id"] if latest else None
        messages = [message_json(m, with_body=with_bodies) for m in grant.messages.values()]
        return {
            "grant_id": grant.id,
            "email": grant.email,
            "status": grant.status,
            "anchor": simulator.anchor,
            "threads": sorted(threads, key=lambda t: t["id"]),
            "messages": sorted(messages, key=lambda m: m["id"]),
        }

    result: dict[str, Any] = simulator.locked(build)
    return result


def write_exports(simulator: Simulator, directory: Path, *, with_bodies: bool = True) -> list[Path]:
    """Write one ``<grant_id>.json`` per grant into ``directory``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for grant_id in sorted(simulator.grants):
        path = directory / f"{grant_id}.json"
        path.write_text(json.dumps(export_grant(simulator, grant_id, with_bodies=with_bodies), ensure_ascii=False))
        paths.append(path)
    return paths
