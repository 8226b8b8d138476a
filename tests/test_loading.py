"""The default model's one-time conversion: one process converts, every other one waits and uses it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blendrag import loading

CONVERT = "from blendrag.loading import default_model_dir; print(default_model_dir())"


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch):
    """Two callers on an empty home: the second waits for the lock and uses the first's result."""
    monkeypatch.setenv("BLENDRAG_HOME", str(tmp_path))
    calls = []

    def fake_convert(src_dir: Path, gguf_file: str, target: Path) -> None:
        calls.append(target)
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(loading.default_model_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert calls == [target]
    assert results == [target, target]


@pytest.mark.slow
def test_two_processes_convert_the_real_model_at_once(tmp_path):
    """Two real first-time conversions at the same moment both succeed, with a readable result."""
    env = dict(os.environ, BLENDRAG_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert [out.strip() for out, _ in outs] == [str(target)] * 2
    assert sum("to safetensors once" in err for _, err in outs) == 1  # one converted, one waited
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in target.iterdir()} == {0o644}
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".convert-")]
