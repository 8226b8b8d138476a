"""The ``blendrag`` entry point: JSON output and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from conftest import SAMPLE_CORPUS

from blendrag.cli import main


def test_query_with_chunks_file_prints_one_json_object(tiny_dirs, tmp_path, capsys):
    chunks = tmp_path / "chunks.json"
    chunks.write_text(json.dumps(["Alpha is a cat.", "Beta is a dog."]))
    argv = ["query", "What is Alpha?", "--chunks-file", str(chunks), "--model", str(tiny_dirs["llama"])]
    assert main(argv + ["--mode", "blend", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"answer", "chunks", "stats", "retrieval_s", "warmup_s"}
    assert out["stats"]["mode"] == "blend" and out["stats"]["n_generated"] <= 4


def test_bad_chunks_file_is_one_line_and_exit_2(tmp_path, capsys):
    chunks = tmp_path / "chunks.json"
    chunks.write_text('{"not": "a list"}')
    assert main(["query", "q", "--chunks-file", str(chunks)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expected a JSON list" in err and str(chunks) in err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "blendrag.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_two_processes_share_kv_through_redis(redis_server, tiny_dirs, tmp_path):
    """`blendrag index` in one process fills Redis; `blendrag query` in another reuses every chunk."""
    model, store, index_dir = str(tiny_dirs["llama"]), redis_server.url, str(tmp_path / "i")
    built = run_cli(
        "index", str(SAMPLE_CORPUS), "--index-dir", index_dir, "--model", model, "--kv-store", store
    )
    assert built.returncode == 0, built.stderr
    assert redis_server.client().dbsize() > 0 and not (tmp_path / "i" / "kv").exists()
    asked = run_cli(
        "query", "Who kept the lighthouse?", "--index-dir", index_dir, "--model", model,
        "--kv-store", store, "--top-k", "3", "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    stats = json.loads(asked.stdout)["stats"]
    assert stats["cache_hits"] == 3 and stats["cache_misses"] == 0


def test_unreachable_redis_at_index_time_still_indexes(tiny_dirs, tmp_path):
    """Redis is a cache: an index built while it is down is complete, its KV computed at query time."""
    index_dir = str(tmp_path / "index")
    built = run_cli(
        "index", str(SAMPLE_CORPUS), "--index-dir", index_dir, "--model", str(tiny_dirs["llama"]),
        "--kv-store", "redis://127.0.0.1:1/0",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "unavailable, computing KV instead" in built.stderr


def test_index_format_and_budget_carry_over_to_query(tiny_dirs, tmp_path, capsys):
    """An index built in int8 within a byte budget: --stats shows both, and a query without
    --kv-format reads the index's int8 entries (hits, not a recompute in the default format)."""
    model, index_dir = str(tiny_dirs["llama"]), str(tmp_path / "i")
    build = ["index", str(SAMPLE_CORPUS), "--index-dir", index_dir, "--model", model]
    assert main([*build, "--kv-format", "int8", "--kv-max-bytes", "64M"]) == 0
    capsys.readouterr()
    assert main(["index", "--stats", "--index-dir", index_dir]) == 0
    stats = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert stats["kv_format"] == "int8" and stats["kv_max_bytes"] == str(64 << 20)
    assert 0 < int(stats["kv_bytes"]) <= 64 << 20
    argv = ["query", "Who kept the lighthouse?", "--index-dir", index_dir, "--model", model]
    assert main([*argv, "--top-k", "2", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["stats"]
    assert out["cache_hits"] == 2 and out["cache_misses"] == 0
    assert main([*build, "--kv-format", "bf16"]) == 2  # mixing formats in one index is refused
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds KV in format int8" in err


def test_index_chunk_context_carries_over_to_query(tiny_dirs, tmp_path, capsys):
    """An index built with --chunk-context prefix: --stats shows it, a query without the flag
    reads its entries (hits), one with the other context is refused in one line."""
    model, index_dir = str(tiny_dirs["llama"]), str(tmp_path / "i")
    build = ["index", str(SAMPLE_CORPUS), "--index-dir", index_dir, "--model", model]
    assert main([*build, "--chunk-context", "prefix"]) == 0
    capsys.readouterr()
    assert main(["index", "--stats", "--index-dir", index_dir]) == 0
    assert "chunk_context: prefix" in capsys.readouterr().out.splitlines()
    argv = ["query", "Who kept the lighthouse?", "--index-dir", index_dir, "--model", model]
    assert main([*argv, "--top-k", "2", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["stats"]
    assert out["cache_hits"] == 2 and out["cache_misses"] == 0
    assert main([*argv, "--chunk-context", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "built with chunk context prefix, not none" in err


@pytest.mark.parametrize(
    "option, message",
    [
        (["--kv-format", "int3"], "unknown KV format 'int3'"),
        (["--kv-max-bytes", "lots"], "expected a positive size"),
    ],
)
def test_bad_kv_options_are_refused_before_anything_is_written(tmp_path, capsys, option, message):
    index_dir = tmp_path / "i"
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(SAMPLE_CORPUS), "--index-dir", str(index_dir), *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not index_dir.exists()
