"""The Procfile (hosts without Docker, run with honcho or foreman): every line is a real ``nova-email`` command
and each worker group gets its own metrics port."""

from __future__ import annotations

import re
import shlex

from .conftest import ROOT, parses_as_nova_email_command

#: What honcho and foreman accept as a process line; anything else (comments) is ignored by both.
PROCESS_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")


def _processes() -> dict[str, list[str]]:
    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        match = PROCESS_LINE.match(line)
        if match:
            processes[match.group(1)] = shlex.split(match.group(2))
    return processes


def test_the_procfile_runs_the_receiver_and_the_four_processors() -> None:
    processes = _processes()

    assert set(processes) == {"webhooks-http", "webhooks", "backfill", "threads", "completion"}
    for name in ("webhooks", "backfill", "threads", "completion"):
        assert processes[name][-2:] == ["run", name]


def test_every_procfile_command_is_a_nova_email_subcommand() -> None:
    for name, words in _processes().items():
        assignments = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)]
        command = words[len(assignments) :]
        assert command[0] == "nova-email", name
        assert parses_as_nova_email_command([w.replace("$PORT", "5000") for w in command[1:]]), (name, command)
        if name != "webhooks-http":
            # honcho/foreman give every process its own $PORT: each worker group's metrics port.
            assert assignments == ["METRICS_PORT=$PORT"], name
