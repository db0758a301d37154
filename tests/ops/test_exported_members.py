"""nova_email.ops exports exactly the command pairs the CLI registers, plus `add_metrics`."""

from __future__ import annotations

import argparse
import inspect
import types

import nova_email.ops


def test_all_lists_every_public_name_and_only_existing_ones() -> None:
    public = {
        name
        for name, value in vars(nova_email.ops).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }

    assert sorted(nova_email.ops.__all__) == sorted(public)


def test_each_command_is_a_run_and_add_arguments_pair_that_builds_a_parser() -> None:
    for name in ("status", "backfill", "dead_letters"):
        run = getattr(nova_email.ops, f"run_{name}")
        add = getattr(nova_email.ops, f"add_{name}_arguments")
        assert list(inspect.signature(run).parameters)[:2] == ["settings", "args"]
        parser = argparse.ArgumentParser()
        add(parser)
        assert parser.format_help()
