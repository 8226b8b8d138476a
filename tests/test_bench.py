"""Smoke runs of the benchmarks on tiny inputs, so they cannot rot: each runs end to end on CPU
with a tiny random-weight model and checks the shape and sanity of what it reports."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import index_throughput, kv_load, novel_queries, prefetch, prefill, roofline

PASSAGE = "The lighthouse at Vellmark was built in {year} by the harbour guild and painted red."


def write_dataset(path: Path, n_questions: int, n_ctxs: int, year: Callable[[int, int], int]) -> Path:
    """A dataset of lighthouse questions, passage j of question i dated ``year(i, j)``."""
    items = [
        {
            "question": f"Who built lighthouse number {i}?",
            "answers": ["the harbour guild"],
            "ctxs": [
                {"title": f"Doc {i}.{j}", "text": PASSAGE.format(year=year(i, j))} for j in range(n_ctxs)
            ],
        }
        for i in range(n_questions)
    ]
    path.write_text(json.dumps(items))
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data.json", 2, 3, lambda i, j: 1800 + 10 * i + j)


def test_prefill_reports_every_method_against_transformers(dataset, tiny_dirs, tmp_path, capsys):
    out, png = tmp_path / "prefill.json", tmp_path / "prefill.png"
    argv = ["--dataset", str(dataset), "--n", "1", "--model", str(tiny_dirs["llama"]), "--kv-store", "memory"]
    argv += ["--ratios", "0.3", "--max-new-tokens", "4", "--out", str(out), "--plot", str(png)]
    assert prefill.main(argv) == 0
    assert "llama.cpp skipped" in capsys.readouterr().out  # no GGUF for a --model: never needed
    summary = {row["method"]: row for row in json.loads(out.read_text())["summary"]}
    assert list(summary) == ["transformers", "full", "reuse", "blend/preview@0.3"]
    assert summary["transformers"]["speedup_vs_transformers"] == pytest.approx(1.0)
    assert summary["full"]["identical_to_full"] == 1.0
    for row in summary.values():
        assert row["n"] == 1 and row["ttft_mean_s"] > 0
    assert png.stat().st_size > 0


def test_prefill_fails_when_reused_kv_was_missing_while_timed(capsys):
    """An evicted chunk is recomputed inside the timed prefill: that row is not a reuse TTFT."""
    hit, miss = {"ttft_s": 0.3, "cache_misses": 0}, {"ttft_s": 6.5, "cache_misses": 2}
    assert prefill.check_no_misses({"full": [miss], "reuse": [hit, hit]}) == 0  # full reuses nothing
    assert prefill.check_no_misses({"transformers": [{"ttft_s": 9.0}], "reuse": [hit, miss]}) == 1
    assert "{'reuse': 2}" in capsys.readouterr().out


def test_prefill_subset_and_bad_input(dataset, tmp_path, capsys):
    assert prefill.main(["--dataset", str(tmp_path / "absent.json")]) == 0
    assert "skipped: no dataset" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown method"):
        prefill.main(["--dataset", str(dataset), "--methods", "full,vllm"])


@pytest.mark.parametrize("cold", [False, True])
def test_prefetch_reports_load_and_both_ttfts(dataset, tiny_dirs, tmp_path, capsys, cold):
    out = tmp_path / "prefetch.json"
    argv = ["--dataset", str(dataset), "--n", "2", "--model", str(tiny_dirs["llama"]), "--out", str(out)]
    assert prefetch.main(argv + ["--kv-dir", str(tmp_path / "kv")] + (["--cold"] if cold else [])) == 0
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 2
    for run in report["runs"]:
        assert run["load_s"] > 0 and run["ttft_foreground_s"] > 0 and run["ttft_background_s"] > 0
        assert 0 <= run["stall_s"] < run["ttft_background_s"]
    assert "% hidden); TTFT" in capsys.readouterr().out
    assert len(list((tmp_path / "kv").rglob("*.kv"))) == 7  # 6 chunks and the shared prompt prefix


def test_index_throughput_smoke(dataset, tiny_dirs, tmp_path):
    out = tmp_path / "index.json"
    argv = ["--dataset", str(dataset), "--passages", "3", "--queries", "1", "--top-k", "2"]
    argv += ["--model", str(tiny_dirs["llama"]), "--resume", "--raw-sample", "1", "--out", str(out)]
    assert index_throughput.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["raw_prefill"]["chunks"] == 1  # a sample of the 3 distinct chunks
    assert report["resume"]["complete"] and report["resume"]["chunks"] == 3
    build = report["build"]
    assert build["chunks"] == 3 and build["counts"]["kv_computed"] == 3
    assert build["kv_tokens_per_s"] > 0 and build["kv_bytes_per_token"] > 0
    (run,) = report["queries"]["runs"]
    assert run["cache_misses"] == 0 and run["n_tokens"] > 0
    assert run["total_s"] >= run["retrieval_s"] + run["kv_load_s"] + run["blend_s"]


def test_roofline_arithmetic():
    s = roofline.Shape()
    assert s.layer_params == 218_103_808  # Llama-3-8B: Q/K/V 25.2 M + O 16.8 M + MLP 176.2 M
    reuse = roofline.model(s, 3072, 32, "reuse", 0.0, check=1)
    # 32 question rows are far below the ridge point: reading the 14 GB of weights is the cost.
    assert reuse["recompute_ms"] == pytest.approx(1e3 * 32 * s.layer_params * 2 / 3.35e12)
    # Measured ceilings replace the datasheet's: twice the bandwidth, half the weight read; at
    # 1 TFLOP/s the LM head's one row is FLOP-bound.
    faster = roofline.model(s, 3072, 32, "reuse", 0.0, check=1, hbm_gbs=6700.0)
    assert faster["recompute_ms"] == pytest.approx(reuse["recompute_ms"] / 2)
    slow = roofline.model(s, 3072, 32, "reuse", 0.0, check=1, peak_tflops=1.0)
    assert slow["logits_ms"] == pytest.approx(1e3 * 2 * s.vocab * s.dim / 1e12)
    full = roofline.model(s, 3072, 32, "full", 0.0, check=1)
    everything = roofline.model(s, 3072, 32, "blend", 1.0, check=1)
    compute = ("all_token_ms", "recompute_ms", "logits_ms")
    assert sum(everything[k] for k in compute) == pytest.approx(sum(full[k] for k in compute), rel=0.01)
    assert full["ttft_gpu_kv_ms"] > roofline.model(s, 3072, 32, "blend", 0.15, check=1)["ttft_gpu_kv_ms"]


def test_novel_query_stream_stays_flat_within_budget_and_degrades_to_recompute(tiny_dirs, tmp_path):
    dataset = write_dataset(tmp_path / "data.json", 4, 5, lambda i, j: 1700 + 7 * i + j)  # 20 passages
    out = tmp_path / "novel.json"
    argv = [
        "--dataset",
        str(dataset),
        "--queries",
        "40",
        "--top-k",
        "3",
        "--window",
        "10",
        "--full-every",
        "5",
    ]
    argv += ["--model", str(tiny_dirs["llama"]), "--out", str(out), "--plot", str(tmp_path / "novel.png")]
    assert novel_queries.main(argv) == 0
    report = json.loads(out.read_text())
    fits, over = report["results"]
    assert report["corpus"]["passages"] == 20
    # The whole corpus fits on disk: every chunk of every novel query is a hit, start to end.
    assert fits["summary"]["hit_rate_per_window"] == [1.0] * 4
    assert {r["disk_bytes"] for r in fits["records"]} == {report["corpus"]["kv_bytes"]}
    # Half of it fits: misses are recomputed (never errors) and the disk stays within its budget.
    budget = over["disk_budget_bytes"]
    assert 0 < over["summary"]["hit_rate"] < 1 and over["store_stats"]["evictions"] > 0
    assert all(r["disk_bytes"] <= budget for r in over["records"])
    assert fits["store_stats"]["corrupt"] == over["store_stats"]["corrupt"] == 0
    assert (tmp_path / "novel.png").stat().st_size > 0


def test_kv_load_times_every_format_from_disk_and_redis(dataset, tiny_dirs, tmp_path, redis_server):
    out = tmp_path / "load.json"
    argv = ["--dataset", str(dataset), "--top-k", "2", "--repeats", "2", "--redis", redis_server.url]
    assert kv_load.main([*argv, "--model", str(tiny_dirs["llama"]), "--out", str(out)]) == 0
    rows = {r["format"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) >= {"fp32", "bf16", "int8", "fp8", "cachegen-8.6.5", "cachegen-8.8.8"}
    assert rows["bf16"]["bytes"] < rows["fp32"]["bytes"] and rows["int8"]["bytes"] < rows["bf16"]["bytes"]
    assert all(r["disk_ms"] > 0 and r["redis_ms"] > 0 for r in rows.values())
    assert redis_server.client().dbsize() == 0  # its keys are removed
