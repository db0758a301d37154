"""The public doors of the Nylas client and the simulator export exactly what they list."""

from __future__ import annotations

import types

import pytest

import nova_email.nylas
import nova_email.simulator


@pytest.mark.parametrize("module", [nova_email.nylas, nova_email.simulator], ids=lambda m: m.__name__)
def test_all_lists_every_public_name_and_only_existing_ones(module: types.ModuleType) -> None:
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }

    assert sorted(module.__all__) == sorted(public)
