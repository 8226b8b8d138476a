"""A CPU shared with other work: bench.busy_cpu on a tiny model (every setting under every load,
no process left behind), and the OpenMP wait policy the CLI chose from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import busy_cpu

SPIN = b"while True: pass"


def children() -> list[bytes]:
    """Command lines of this process's live child processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if ppid == os.getpid():
            found.append(cmdline)
    return found


def test_every_setting_under_every_load(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "busy.json"
    argv = ["--model", str(tiny_dirs["llama"]), "--loads", "0,1", "--threads", "2,1"]
    argv += ["--n", "2", "--top-k", "2", "--out", str(out)]
    assert busy_cpu.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["load"], r["policy"], r["threads"], r["prefetch"]) for r in rows] == [
        (load, policy, threads, prefetch)
        for load in (0, 1)
        for policy in ("default", "passive")
        for threads in (2, 1)
        for prefetch in (True, False)
    ]
    for r in rows:
        assert r["full_s"] > 0 and r["blend_s"] > 0
        assert r["speedup"] == r["full_s"] / r["blend_s"]
    assert "spinners   policy  threads prefetch" in capsys.readouterr().out
    assert children() == []  # spinners and workers


def test_spinners_run_only_inside_the_block():
    with busy_cpu.spinners(2):
        assert [SPIN in c for c in children()] == [True, True]
    assert children() == []


def test_a_worker_runs_under_its_wait_policy(monkeypatch):
    """Each worker's OMP_WAIT_POLICY is its own, whatever the parent's environment says."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "OMP_WAIT_POLICY" not in busy_cpu.worker_env("default")
    assert busy_cpu.worker_env("passive")["OMP_WAIT_POLICY"] == "PASSIVE"


PROBE = (
    "import os, sys; from blendrag.cli import sleep_at_barriers; {before}sleep_at_barriers(); "
    "print(os.environ.get('OMP_WAIT_POLICY'))"
)


def cli_policy(before: str = "", **env: str) -> str:
    """OMP_WAIT_POLICY once the CLI's setup has run in a fresh process."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    cmd = [sys.executable, "-c", PROBE.format(before=before)]
    return subprocess.run(cmd, env=environ | env, capture_output=True, text=True, check=True).stdout.strip()


def test_the_cli_lets_openmp_threads_sleep_at_barriers():
    assert cli_policy() == "PASSIVE"
    assert cli_policy(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice wins
    assert cli_policy(GOMP_SPINCOUNT="300000") == "None"
    assert cli_policy(before="import torch; ") == "None"  # too late to matter: left alone
