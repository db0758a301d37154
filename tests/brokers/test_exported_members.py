"""The public door of `brokers`: ``__all__`` lists exactly the public names, sorted (httpx's test, copied)."""

from __future__ import annotations

import subprocess
import sys

import brokers

#: Public-looking names that are not members: `from __future__ import annotations` leaves one behind.
NOT_MEMBERS = {"annotations"}


def test_all_lists_every_public_member_sorted() -> None:
    exported_members = [member for member in dir(brokers) if not member.startswith("_")]
    # Submodules are attributes once imported; they are not part of the door.
    public = sorted(
        member
        for member in exported_members
        if member not in NOT_MEMBERS and not isinstance(getattr(brokers, member), type(sys))
    )
    assert brokers.__all__ == sorted(brokers.__all__)
    assert public == brokers.__all__


def test_importing_brokers_loads_no_nova_email_module() -> None:
    code = "import sys, brokers; print(sorted(m for m in sys.modules if m.split('.')[0] == 'nova_email'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
