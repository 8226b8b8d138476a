"""bench.gpu_check, the one-shot GPU check, kept from rotting: its smoke run through the script a
GPU machine runs (every section, check, timed case and kernel, on CPU), and its checks failing
when what they check is broken."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check, synthetic
from blendrag import kernels
from blendrag.kernels import reference
from blendrag.store import MemoryStore

ROOT = Path(__file__).resolve().parents[1]
CHUNKS = synthetic.chunk_texts(3, 24, seed=1)
QUESTION = synthetic.random_text(12, random.Random(2))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """``scripts/gpu-check.sh --smoke`` with no virtualenv or PYTHONPATH of the caller's."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {"OUT": str(out), "PYTHON": sys.executable}
    script = ROOT / "scripts" / "gpu-check.sh"
    proc = subprocess.run(
        ["bash", str(script), "--smoke"], cwd=out, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        "report": json.loads((out / "gpu-check-smoke.json").read_text()),
        "markdown": (out / "gpu-check-smoke.md").read_text(),
        "log": (out / "gpu-check-smoke.log").read_text(),
    }


def test_smoke_runs_every_check_on_every_model(smoke):
    report = smoke["report"]
    assert report["errors"] == []
    assert report["environment"]["blendrag"] == str(ROOT / "blendrag")
    checks: dict[str, list[str]] = {}
    for row in report["checks"]:
        assert row["ok"], row
        checks.setdefault(row["model"], []).append(row["check"])
    dtypes = ("float32", "bfloat16")
    tiny = {f"tiny-{v} {d}" for v in synthetic.TINY_VARIANTS for d in dtypes}
    assert set(checks) == tiny | {f"tiny {d}" for d in dtypes}  # "tiny": the smoke run's 8B shape
    for model, names in checks.items():
        kinds = ["blend@1.0 (deviation)", "blend@1.0 (preview)", "re-aligned K", "selective attention"]
        assert all(any(n.startswith(kind) for n in names) for kind in kinds), (model, names)
        assert sum("every layer, exact first chunk" in n for n in names) == 1
        twins = sum(n.endswith("= CPU engine") for n in names)
        assert twins == (len(gpu_check.TWIN_CASES) if model.startswith("tiny-") and "float32" in model else 0)
    for row in report["checks"]:  # bf16 logits and deep keys are held to their fp32 reference's noise
        noisy = "bfloat16" in row["model"] and (
            "logits = full" in row["check"] or "every layer" in row["check"]
        )
        assert (row["noise"] is not None) == noisy, row
        assert row["noise"] is None or row["tolerance"] >= 2 * row["noise"]


def test_smoke_times_every_mode_location_and_kernel(smoke):
    report = smoke["report"]
    rows = report["prefill"]
    cases = list(gpu_check.prefill_cases([0.05, 0.15, 0.3]))
    assert len(cases) == 1 + 3 * 7  # full; per location reuse and blend x 2 selectors x 3 ratios
    assert [(r["chunks"], r["method"], r["kv"]) for r in rows] == [
        (n, method, kv) for n in (1, 2) for method, _, _, kv in cases
    ]
    for r in rows:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and len(r["all_ms"]) == 2
        # The roofline models full, reuse and deviation blend, not the preview selector.
        assert (r["model_ms"] is None) == ("preview" in r["method"])
        assert r["model_ms"] is None or r["vs_model"] == pytest.approx(r["median_ms"] / r["model_ms"])
    assert [r["kernel"].split(" (")[0] for r in report["kernels"]] == [
        "rope_realign", "kv_deviation", "kv_scatter", "selective_mask", "selective_attention",
        "selective_attention",
    ]  # fmt: skip
    for r in report["kernels"]:
        assert r["ok"] and r["ms"] > 0
        assert (r["copy_ms"] > 0) if r["mb"] else ("copy_ms" not in r)
    ceilings = report["ceilings"]
    assert ceilings["copy_gbs"] > 0 and ceilings["gemm_tflops"] > 0 and ceilings["h2d_gbs"] is None
    for heading in ("## Correctness", "## Prefill TTFT (ms)", "## Kernels"):
        assert heading in smoke["markdown"]
    assert smoke["markdown"].rstrip().endswith("all checks passed.")
    assert smoke["markdown"] in smoke["log"]  # what the machine prints is the table it writes


def tiny_engine(dtype: torch.dtype = torch.float32):
    config = synthetic.model_config("tiny")
    model = synthetic.random_model(config, "cpu", dtype)
    return synthetic.engine(model, config, MemoryStore(1 << 30), "tiny", chunk_context="prefix")


def failed(rows: list[dict]) -> set[str]:
    return {r["check"] for r in rows if not r["ok"]}


def test_checks_pass_on_a_sound_engine():
    assert failed(gpu_check.engine_checks(tiny_engine(), "tiny", CHUNKS, QUESTION)) == set()


def test_checks_fail_when_reused_keys_are_not_realigned(monkeypatch):
    monkeypatch.setattr(kernels, "rope_realign", lambda *args: None)
    bad = failed(gpu_check.engine_checks(tiny_engine(), "tiny", CHUNKS, QUESTION))
    assert {
        "blend@1.0 (deviation) logits = full",  # the reused prefix keeps position-0 keys
        "re-aligned K = fresh K, layer 0, every reused position",
        "re-aligned K = fresh K, every layer, exact first chunk",
    } <= bad


def test_attention_check_fails_under_a_wrong_mask(monkeypatch):
    # Each query sees the keys up to the one before its own position: off by one.
    monkeypatch.setattr(kernels, "selective_mask", lambda pos, n: reference.causal_by_position(pos - 1, n))
    bad = failed(gpu_check.engine_checks(tiny_engine(), "tiny", CHUNKS, QUESTION))
    assert "selective attention (sdpa, boolean mask) = fp64 oracle" in bad


@torch.inference_mode()
def test_kernel_check_fails_on_a_scatter_that_skips_v(monkeypatch):
    inputs = gpu_check.kernel_inputs(tiny_engine(), CHUNKS, QUESTION, 0.15)
    assert gpu_check.scatter_case(inputs).error == 0.0
    monkeypatch.setattr(
        kernels, "kv_scatter", lambda k_layer, v_layer, pos, k, v: k_layer.index_copy_(1, pos, k)
    )
    case = gpu_check.scatter_case(inputs)
    assert case.error > case.tolerance == 0.0


def test_ok_needs_every_check_and_kernel_within_tolerance():
    report = {
        "errors": [],
        "prefill": [{"median_ms": 1.0}],
        "checks": [{"ok": True}],
        "kernels": [{"ok": True}],
    }
    assert gpu_check.ok(report)
    assert not gpu_check.ok(report | {"kernels": [{"ok": False}]})
    assert not gpu_check.ok(report | {"checks": [gpu_check.check("c", "m", float("nan"), 1.0)]})
    assert not gpu_check.ok(report | {"prefill": [{"error": "OutOfMemoryError: ..."}]})
    assert not gpu_check.ok(report | {"errors": [{"section": "kernels", "error": "..."}]})


def test_markdown_shows_failed_skipped_and_raised_parts(smoke):
    report = smoke["report"] | {
        "checks": [gpu_check.check("blend@1.0 (deviation) logits = full", "m", 0.5, 0.02, noise=0.01)],
        "prefill": [
            {"chunks": 24, "tokens": 12401, "method": "full", "kv": "device", "error": "OutOfMemoryError: x"},
            {"chunks": 24, "tokens": 12401, "method": "reuse", "kv": "device", "skipped": "time budget"},
        ],
        "kernels": [{"kernel": "kv_scatter", "skipped": "time budget", "error": None}],
        "errors": [{"section": "kernels", "error": "RuntimeError: y"}],
    }
    text = gpu_check.markdown(report)
    assert "| m | blend@1.0 (deviation) logits = full | 5.00e-01 | 2.0e-02 | 1.0e-02 | NO |" in text
    assert "| full | device | OutOfMemoryError: x |" in text and "| reuse | device | time budget |" in text
    assert "| kv_scatter | time budget |" in text and "- kernels: RuntimeError: y" in text
    assert text.rstrip().endswith("FAILED.")


def test_without_cuda_the_check_exits_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: no CUDA device" in err and "--smoke" in err
    assert list(tmp_path.iterdir()) == []
