"""The package's public door lists exactly its public names (as httpx's tests/test_exported_members.py does)."""

from __future__ import annotations

import nova_email.intake as intake


def test_all_lists_every_public_name_and_nothing_else() -> None:
    public = {name for name in dir(intake) if not name.startswith("_")}
    modules = {"app", "errors", "metrics", "queries", "receiver", "refusals", "server", "signature"}
    future_import = {"annotations"}

    assert set(intake.__all__) == public - modules - future_import
    assert len(intake.__all__) == len(set(intake.__all__))
