"""Simulated mailboxes: the records, the deterministic generator, and their Nylas JSON.

A mailbox is a pure function of (seed, grant id, anchor, thread count): the same inputs give the same ids, dates,
participants and bodies. Bodies are not stored; each is regenerated from the message's own seed when asked for, so
10,000 threads / 50,000 messages cost a few tens of MB.

Thread fields are derived from the messages exactly as docs/nylas-v3.md (b.6) says: participants union, message ids,
earliest/latest dates, unread = any unread, folders union, has_attachments, latest_draft_or_message.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from typing import Any

import attrs

from nova_email.simulator import corpus

__all__ = [
    "DAY_S",
    "HISTORY_DAYS",
    "Grant",
    "SimMessage",
    "SimThread",
    "generate_grant",
    "message_json",
    "thread_json",
]

DAY_S = 86_400
#: Threads' latest messages are spread over this many days before the anchor, so a one-year cut drops about 1/3.
HISTORY_DAYS = 540
#: Share of messages with a large body, and its size range in characters.
LARGE_BODY_SHARE = 0.01
LARGE_BODY_CHARS = (100_000, 400_000)
#: Messages per thread: (weight, low, high). Mean is about 5.8; the tail goes past 50.
_THREAD_SIZES = (
    (30, 1, 1), (18, 2, 2), (12, 3, 3), (14, 4, 5), (14, 6, 10), (7, 11, 20), (4, 21, 49), (1, 50, 60),
)  # fmt: skip
_ATTACHMENT_TYPES = (
    ("report.pdf", "application/pdf"), ("photo.jpg", "image/jpeg"), ("données.xlsx", "application/vnd.ms-excel"),
    ("notes.txt", "text/plain"), ("設計書.docx", "application/msword"), ("logo.png", "image/png"),
)  # fmt: skip
_EXTRA_LABELS = ("IMPORTANT", "CATEGORY_PROMOTIONS", "CATEGORY_UPDATES", "Label_42", "Label_ünï")


@attrs.define(slots=True, kw_only=True)
class SimMessage:
    """One stored message. ``body`` is ``None`` until a mutation sets one; then it overrides the generated body."""

    id: str
    grant_id: str
    thread_id: str
    subject: str
    from_: tuple[tuple[str, str], ...]
    to: tuple[tuple[str, str], ...]
    cc: tuple[tuple[str, str], ...] = ()
    date: int
    created_at: int
    unread: bool
    starred: bool
    folders: tuple[str, ...]
    attachments: tuple[dict[str, Any], ...] = ()
    body_seed: str
    body_size: int
    body: str | None = None

    @property
    def sent(self) -> bool:
        """Whether the mailbox owner sent it (it then counts for latest_message_sent_date, not received)."""
        return "SENT" in self.folders

    @property
    def draft(self) -> bool:
        """Whether it is an unsent draft (served as ``object: "draft"``, never by ``/messages``)."""
        return "DRAFT" in self.folders

    def opening_and_body(self) -> tuple[str, str]:
        """(first paragraph, HTML body); regenerated from ``body_seed`` unless a mutation stored a body."""
        rng = random.Random(self.body_seed)
        opening = corpus.first_paragraph(rng)
        if self.body is not None:
            return _plain(self.body)[:200], self.body
        return opening, corpus.body_html(rng, opening, self.body_size)

    def snippet(self) -> str:
        """The plain-text preview (first 100 characters), without generating the whole body."""
        if self.body is not None:
            return _plain(self.body)[:100]
        return corpus.first_paragraph(random.Random(self.body_seed))[:100]


@attrs.define(slots=True, kw_only=True)
class SimThread:
    """A thread: its messages in date order (oldest first), and unsent drafts (not messages: ``/messages`` skips them).

    A thread of drafts only has no messages at all, the one way a thread with zero messages exists at Nylas.
    """

    id: str
    grant_id: str
    messages: list[SimMessage] = attrs.field(factory=list)
    drafts: list[SimMessage] = attrs.field(factory=list)

    @property
    def latest_received(self) -> int | None:
        """``latest_message_received_date``: the newest message the owner did not send."""
        dates = [m.date for m in self.messages if not m.sent]
        return max(dates) if dates else None


@attrs.define(kw_only=True)
class Grant:
    """One simulated grant and its mailbox."""

    id: str
    email: str
    provider: str = "google"
    status: str = "valid"
    threads: dict[str, SimThread] = attrs.field(factory=dict)
    messages: dict[str, SimMessage] = attrs.field(factory=dict)
    contacts: list[tuple[str, str]] = attrs.field(factory=list)


def _plain(html: str) -> str:
    out, depth = [], 0
    for ch in html:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif not depth:
            out.append(ch)
    return "".join(out).strip()


def _id(prefix: str, *parts: object) -> str:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=10).hexdigest()
    return f"{prefix}{digest}"


def _thread_size(rng: random.Random) -> int:
    roll = rng.randrange(sum(w for w, _, _ in _THREAD_SIZES))
    for weight, low, high in _THREAD_SIZES:
        if roll < weight:
            return rng.randint(low, high)
        roll -= weight
    return 1


def _attachments(rng: random.Random, grant_id: str, message_id: str) -> tuple[dict[str, Any], ...]:
    if rng.random() >= 0.15:
        return ()
    items = []
    for k in range(rng.randint(1, 3)):
        filename, content_type = rng.choice(_ATTACHMENT_TYPES)
        inline = content_type.startswith("image/") and rng.random() < 0.3
        item: dict[str, Any] = {
            "id": f"att_{message_id}_{k}",
            "grant_id": grant_id,
            "filename": filename,
            "content_type": content_type,
            "size": rng.randint(1_000, 10_000_000),
            "is_inline": inline,
        }
        if inline:
            item["content_id"] = f"cid{k}@{message_id}"
            item["content_disposition"] = "inline"
        items.append(item)
    return tuple(items)


def build_message(
    rng: random.Random,
    grant: Grant,
    thread_id: str,
    *,
    message_id: str,
    subject: str,
    sender: tuple[str, str],
    recipients: tuple[tuple[str, str], ...],
    date: int,
    anchor: int,
    large_body_share: float = LARGE_BODY_SHARE,
) -> SimMessage:
    """One message with generated flags, folders and attachments (used by the generator and by mutations)."""
    owner = (grant.id, grant.email)
    sent = sender[1] == grant.email
    recent = anchor - date < 30 * DAY_S
    unread = not sent and rng.random() < (0.35 if recent else 0.03)
    folders = ["SENT"] if sent else ["INBOX"]
    if unread:
        folders.append("UNREAD")
    if rng.random() < 0.1:
        folders.append(rng.choice(_EXTRA_LABELS))
    large = rng.random() < large_body_share
    size = rng.randint(*LARGE_BODY_CHARS) if large else rng.randint(200, 4_000)
    cc = (rng.choice(grant.contacts),) if rng.random() < 0.2 and grant.contacts else ()
    return SimMessage(
        id=message_id,
        grant_id=grant.id,
        thread_id=thread_id,
        subject=subject,
        from_=(sender,),
        to=recipients if sent else (owner,),
        cc=cc,
        date=date,
        created_at=date + rng.randint(0, 5),
        unread=unread,
        starred=rng.random() < 0.05,
        folders=tuple(folders),
        attachments=_attachments(rng, grant.id, message_id),
        body_seed=f"{message_id}:body",
        body_size=size,
    )


def generate_grant(
    *, seed: int, grant_id: str, threads: int, anchor: int, large_body_share: float = LARGE_BODY_SHARE
) -> Grant:
    """Generate the mailbox of one grant; deterministic in (seed, grant_id, threads, anchor, large_body_share)."""
    rng = random.Random(f"{seed}:{grant_id}")
    grant = Grant(id=grant_id, email=f"{grant_id}@inbox.example")
    grant.contacts = [corpus.contact(rng, i) for i in range(max(20, threads // 20))]
    for i in range(threads):
        thread_id = _id("thr_", seed, grant_id, i)
        thread = SimThread(id=thread_id, grant_id=grant_id)
        people = tuple(rng.sample(grant.contacts, k=min(len(grant.contacts), rng.randint(1, 4))))
        count = _thread_size(rng)
        latest = anchor - rng.randint(0, HISTORY_DAYS * DAY_S)
        span = rng.randint(0, min(30 * DAY_S, count * 2 * DAY_S))
        dates = sorted(latest - rng.randint(0, span) for _ in range(count - 1)) + [latest]
        topic = corpus.subject(rng)
        for j, date in enumerate(dates):
            # The first message is always received, so every thread has a latest_message_received_date.
            sender = people[0] if j == 0 else rng.choice((*people, (grant_id, grant.email)))
            message = build_message(
                rng,
                grant,
                thread_id,
                message_id=_id("msg_", seed, grant_id, i, j),
                subject=topic if j == 0 else f"Re: {topic}",
                sender=sender,
                recipients=people,
                date=date,
                anchor=anchor,
                large_body_share=large_body_share,
            )
            thread.messages.append(message)
            grant.messages[message.id] = message
        grant.threads[thread_id] = thread
    return grant


def _participants(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": name, "email": email} for name, email in pairs]


def message_json(message: SimMessage, *, with_body: bool = True) -> dict[str, Any]:
    """The message as Nylas returns it (docs b.5)."""
    data: dict[str, Any] = {
        "object": "draft" if message.draft else "message",
        "id": message.id,
        "grant_id": message.grant_id,
        "thread_id": message.thread_id,
        "subject": message.subject,
        "from": _participants(message.from_),
        "to": _participants(message.to),
        "cc": _participants(message.cc),
        "bcc": [],
        "reply_to": [],
        "date": message.date,
        "created_at": message.created_at,
        "unread": message.unread,
        "starred": message.starred,
        "snippet": message.snippet(),
        "folders": list(message.folders),
        "attachments": [dict(a) for a in message.attachments],
        "metadata": {},
    }
    if with_body:
        data["body"] = message.opening_and_body()[1]
    return data


def thread_json(thread: SimThread, *, with_latest_body: bool = True) -> dict[str, Any]:
    """The thread as Nylas returns it (docs b.4), derived from its messages and drafts.

    Dates and ``message_ids`` come from messages only; subject, snippet, participants, folders and
    ``latest_draft_or_message`` from drafts too (unconfirmed: which fields Nylas derives from drafts).
    """
    messages = thread.messages
    # A stable sort on the date alone keeps the messages' own order, so a thread without drafts is unchanged.
    items = sorted((*messages, *thread.drafts), key=lambda m: m.date)
    participants: dict[str, tuple[str, str]] = {}
    folders: dict[str, None] = {}
    for m in items:
        for name, email in (*m.from_, *m.to, *m.cc):
            participants.setdefault(email, (name, email))
        folders.update(dict.fromkeys(m.folders))
    sent_dates = [m.date for m in messages if m.sent]
    latest = items[-1] if items else None
    return {
        "object": "thread",
        "id": thread.id,
        "grant_id": thread.grant_id,
        "subject": items[0].subject if items else "",
        "snippet": latest.snippet() if latest else "",
        "participants": _participants(participants.values()),
        "message_ids": [m.id for m in messages],
        "draft_ids": [d.id for d in thread.drafts],
        "folders": list(folders),
        "unread": any(m.unread for m in messages),
        "starred": any(m.starred for m in items),
        "has_attachments": any(m.attachments for m in items),
        "has_drafts": bool(thread.drafts),
        "earliest_message_date": messages[0].date if messages else None,
        "latest_message_received_date": thread.latest_received,
        "latest_message_sent_date": max(sent_dates) if sent_dates else None,
        "latest_draft_or_message": message_json(latest, with_body=with_latest_body) if latest else None,
    }
