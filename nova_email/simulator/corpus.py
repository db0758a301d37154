"""Words, names and subjects the mailbox generator draws from: mixed scripts, accents and emoji on purpose."""

from __future__ import annotations

import random

__all__ = ["FIRST_NAMES", "LAST_NAMES", "body_html", "contact", "first_paragraph", "subject"]

FIRST_NAMES = (
    "Ada", "Bob", "Chloé", "Dmitri", "Émile", "Fatima", "Günther", "Hana", "Ingrid", "José", "Kofi", "Léa",
    "Mateo", "Noémie", "Oluwaseun", "Priya", "Quentin", "Ružena", "Søren", "Takeshi", "Uxía", "Valentina",
    "Wei", "Xochitl", "Yusuf", "Zoë", "Ελένη", "Дмитрий", "王伟", "さくら", "김민준", "أحمد",
)  # fmt: skip
LAST_NAMES = (
    "Lovelace", "Martin", "Dubois", "Ivanov", "García", "Müller", "Nakamura", "Okafor", "Østergaard", "Silva",
    "Kowalczyk", "Nguyễn", "O'Brien", "Van der Berg", "Παπαδόπουλος", "Смирнов", "李", "田中", "박", "حداد",
)  # fmt: skip
_DOMAINS = ("example.org", "example.net", "example.com", "corp.example", "mail.example", "bücher.example")
_TOPICS = (
    "Quarterly numbers", "Réunion de lundi", "会议纪要", "Привет из Москвы", "🚀 Launch plan", "Invoice #{n}",
    "Your order {n} has shipped", "Ünïcödé tëst", "Contract renewal", "Offsite ✈️ logistics", "Bug {n}: crash on save",
    "Weekly digest", "Café ☕ tomorrow?", "Résumé attached", "Budget 2026", "Ταξίδι στην Αθήνα", "お疲れ様です",
    "Security alert", "Pull request #{n}", "Dinner plans 🍝", "Re-org FAQ", "Newsletter: {n} things we learned",
)  # fmt: skip
_WORDS = (
    "the", "project", "deadline", "numbers", "attached", "please", "review", "meeting", "tomorrow", "budget",
    "draft", "thanks", "regards", "update", "customer", "shipping", "naïve", "façade", "coöperate", "jalapeño",
    "straße", "smörgåsbord", "déjà", "vu", "über", "piñata", "数据", "报告", "отчёт", "данные", "δεδομένα",
    "データ", "보고서", "تقرير", "✅", "📎", "🙂", "and", "we", "should", "schedule", "a", "call", "about", "it",
)  # fmt: skip


def contact(rng: random.Random, index: int) -> tuple[str, str]:
    """A (name, email) pair; the index keeps emails unique within one mailbox."""
    first = rng.choice(FIRST_NAMES)
    last = rng.choice(LAST_NAMES)
    domain = rng.choice(_DOMAINS)
    return f"{first} {last}", f"contact{index}@{domain}"


def subject(rng: random.Random) -> str:
    """A thread subject."""
    return rng.choice(_TOPICS).format(n=rng.randint(100, 99999))


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
    return " ".join(words).capitalize() + rng.choice((".", ".", "!", "?"))


# Bodies are assembled from a fixed stock of sentences: drawing words one by one made large bodies the simulator's
# main CPU cost in benchmarks.
_SENTENCES = tuple(_sentence(random.Random(f"sentence:{i}")) for i in range(1024))


def first_paragraph(rng: random.Random) -> str:
    """The opening paragraph; the snippet is cut from it, so it is drawn first from the message's generator."""
    return " ".join(rng.choices(_SENTENCES, k=rng.randint(1, 3)))


def body_html(rng: random.Random, opening: str, size: int) -> str:
    """An HTML body of about ``size`` characters that starts with ``opening`` (``rng`` continues after it)."""
    paragraphs = [f"<p>{opening}</p>"]
    length = len(paragraphs[0])
    while length < size:
        paragraph = "<p>" + " ".join(rng.choices(_SENTENCES, k=rng.randint(2, 8))) + "</p>"
        paragraphs.append(paragraph)
        length += len(paragraph)
    return "<div>" + "\n".join(paragraphs) + "</div>"
