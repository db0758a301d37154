"""Changes at the simulated Nylas whose webhooks are lost: what only a new backfill can bring into the mirror."""

from __future__ import annotations

from nova_email.simulator.server import SimulatorHandle


def change_three_threads(nylas: SimulatorHandle, grant: str, candidates: list[str]) -> list[str]:
    """Change three of `candidates` at Nylas without webhooks, each in a field of the thread itself: a reply comes,
    the one unread message is read, a message is starred. Returns the three ids."""
    threads = nylas.simulator.grants[grant].threads
    replied = candidates[0]
    read = next(t for t in candidates[1:] if sum(m.unread for m in threads[t].messages) == 1)
    starred = next(t for t in candidates[1:] if t != read and not any(m.starred for m in threads[t].messages))
    nylas.simulator.add_message(grant, thread_id=replied, emit=False)
    unread = next(m for m in threads[read].messages if m.unread)
    nylas.simulator.update_message(grant, unread.id, unread=False, emit=False)
    nylas.simulator.update_message(grant, threads[starred].messages[0].id, starred=True, emit=False)
    return [replied, read, starred]
