"""The simulator's entry point (`nova-email fake-nylas`) as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from nova_email.simulator import main

ENTRY = [sys.executable, "-c", "import sys; from nova_email.simulator.server import main; sys.exit(main())"]


@pytest.fixture
def server_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    args = ["--port", "0", "--seed", "4", "--grants", "2", "--threads", "30", "--api-key", "proc-key-123456"]
    args += ["--rate-limit-per-s", "1000", "--anchor", "1793491200"]
    proc = subprocess.Popen([*ENTRY, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server prints its address (or exits)
        assert line.startswith("fake-nylas listening on "), line
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_entry_point_serves_the_api_until_terminated(server_process: tuple[subprocess.Popen[str], str]) -> None:
    proc, base_url = server_process

    health = requests.get(f"{base_url}/_sim/health", timeout=5).json()
    threads = requests.get(
        f"{base_url}/v3/grants/grant-2/threads", headers={"Authorization": "Bearer proc-key-123456"}, timeout=5
    )
    faults = requests.get(f"{base_url}/_sim/faults", timeout=5).json()

    assert health == {"status": "ok", "grants": 2}
    assert threads.status_code == 200 and len(threads.json()["data"]) == 30
    assert faults["rate_limit_per_s"] == 1000 and faults["seed"] == 4
    assert proc.poll() is None


def test_export_writes_the_ground_truth_and_exits(tmp_path: Path) -> None:
    code = main(
        ["--seed", "4", "--grants", "a,b", "--threads", "5", "--anchor", "1793491200", "--export", str(tmp_path)]
    )

    assert code == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.json", "b.json"]
    truth = json.loads((tmp_path / "a.json").read_text())
    assert truth["grant_id"] == "a" and len(truth["threads"]) == 5


def test_an_http_intake_without_a_secret_is_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--webhook-url", "http://127.0.0.1:9/hook"])

    assert exited.value.code == 2
    assert "--webhook-secret" in capsys.readouterr().err
