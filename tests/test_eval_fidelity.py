"""The teacher-forced fidelity screen (eval.fidelity) on a tiny random-weight model."""

import json

import pytest
import torch

from blendrag import BlendConfig
from eval import fidelity, noise_floor
from harness.runner import Backend
from harness.variants import parse_variants

ITEMS = [
    {
        "question": "Who built the lighthouse at Varden Point?",
        "answers": ["Hilde Marsk"],
        "ctxs": [
            {"title": "Varden Point", "text": "The lighthouse was built in 1871 by Hilde Marsk."},
            {"title": "Marsk", "text": "Marsk trained in Bergen and designed three harbours."},
            {"title": "Lens", "text": "In 1903 the lamp was replaced by a Fresnel lens."},
        ],
    },
    {
        "question": "When was the lamp replaced?",
        "answers": ["1903"],
        "ctxs": [
            {"title": "Lens", "text": "In 1903 the lamp was replaced by a Fresnel lens."},
            {"title": "Keepers", "text": "Four keepers lived at the station until 1960."},
        ],
    },
]


def test_identical_is_exact_and_references_are_cached(tiny_engine, tmp_path, monkeypatch):
    backend = Backend(tiny_engine, BlendConfig())
    variants = parse_variants("preview@1.0;reuse")
    records = fidelity.evaluate(backend, ITEMS, variants, top_k=3, max_new_tokens=8, cache=tmp_path)
    for item, record in zip(ITEMS, records, strict=True):
        exact = record["results"]["preview@1.0"]
        assert exact["identical"] == 1.0 and exact["kl_first"] < 1e-6
        # Teacher forcing must agree with real greedy decoding, token for token.
        chunks = [f"{c['title']}\n{c['text']}" for c in item["ctxs"]]
        full = tiny_engine.generate(chunks, item["question"], mode="full", max_new_tokens=8)
        reuse = tiny_engine.generate(chunks, item["question"], mode="reuse", max_new_tokens=8)
        same = reuse.token_ids == full.token_ids and reuse.finish_reason == full.finish_reason
        assert record["results"]["reuse"]["identical"] == float(same)
    assert len(list(tmp_path.glob("*.pt"))) == len(ITEMS)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached reference should have been used")

    monkeypatch.setattr(fidelity, "compute_reference", no_recompute)
    again = fidelity.evaluate(backend, ITEMS, variants, top_k=3, max_new_tokens=8, cache=tmp_path)

    def quality(recs):  # everything but the timings, which differ from run to run
        return [
            {v: {k: x for k, x in r.items() if k != "ttft_s"} for v, r in rec["results"].items()}
            for rec in recs
        ]

    assert quality(again) == quality(records)
    summary = fidelity.summarize_all(again, [v.name for v in variants])
    assert [row["name"] for row in summary] == ["preview@1.0", "reuse"]
    assert summary[0]["identical"] == 1.0


def test_main_prints_the_table_and_writes_json(tiny_dirs, tmp_path, capsys):
    dataset, out = tmp_path / "data.json", tmp_path / "fid.json"
    dataset.write_text(json.dumps(ITEMS))
    argv = ["--dataset", str(dataset), "--variants", "reuse;preview@0.5", "--model", str(tiny_dirs["llama"])]
    argv += ["--kv-store", "memory", "--max-new-tokens", "4", "--ref-cache", str(tmp_path / "refs")]
    assert fidelity.main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["variant", "ident", "line1", "agreed"]
    assert [line.split()[0] for line in table[1:3]] == ["reuse", "preview@0.5"]
    summary = json.loads(out.read_text())["summary"]
    assert all(0 <= row["first_miss"] <= 4 and row["n"] == 2 for row in summary)


def test_a_floor_that_rounds_nothing_is_full_prefill(tiny_engine):
    """The floors' own prefill and teacher forcing reproduce the engine's full prefill exactly, so
    what a floor row shows is its rounding alone."""
    chunks, question = [c["text"] for c in ITEMS[0]["ctxs"]], ITEMS[0]["question"]
    floor = noise_floor.Floor(tiny_engine, "kv=bf16")
    floor.rounding = lambda x: x
    run = floor.prefill(chunks, question, capacity=3)
    full = tiny_engine.prefill(chunks, question, mode="full", max_new_tokens=3)
    assert torch.equal(run.logits, full.logits)
    assert torch.equal(run.extend([5, 6, 7]), tiny_engine.continuation_logits(full, [5, 6, 7]))


def test_kv_roundings():
    x = torch.tensor([[[1000.0, -1000.0, 1.0, 0.3]]])
    assert noise_floor.KV_ROUNDINGS["fp8"](x).tolist() == [[[448.0, -448.0, 1.0, 0.3125]]]  # saturates
    torch.manual_seed(0)
    y = torch.randn(2, 50, 16) * torch.logspace(-3, 3, 50)[None, :, None]  # tokens of very different sizes
    per_token = noise_floor.KV_ROUNDINGS["fp8-token"](y)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each token's largest value, whatever its size.
    assert ((per_token - y).abs() <= y.abs().amax(-1, keepdim=True) / 16).all()
    assert torch.equal(noise_floor.KV_ROUNDINGS["bf16"](y), y.bfloat16().float())


def test_floors_and_gold_f1_in_the_report(tiny_engine, tmp_path):
    backend = Backend(tiny_engine, BlendConfig())
    variants = parse_variants("preview@0.5")
    floors = ["kv=fp16", "kv=fp8", "weights=bf16"]
    plain = fidelity.evaluate(backend, ITEMS, variants, 3, 6, tmp_path)
    gold = fidelity.evaluate(backend, ITEMS, variants, 3, 6, tmp_path, floors, with_gold=True)
    for before, after in zip(plain, gold, strict=True):
        # Decoding for gold F1 first, then rewinding, leaves teacher forcing as it was.
        scores = {k: v for k, v in after["results"]["preview@0.5"].items() if k not in ("ttft_s", "f1_gold")}
        assert scores == {k: v for k, v in before["results"]["preview@0.5"].items() if k != "ttft_s"}
        assert set(after["results"]) == {"preview@0.5", *floors}
        assert 0.0 <= after["full_f1_gold"] <= 1.0
        assert all(0.0 <= r["f1_gold"] <= 1.0 for r in after["results"].values())
        assert after["results"]["kv=fp8"]["kl_first"] > after["results"]["kv=fp16"]["kl_first"]
    summary = fidelity.summarize_all(gold, ["preview@0.5", *floors])
    lo, hi = summary[1]["kl_first_ci"]
    assert lo <= summary[1]["kl_first"] <= hi
    assert "F1gold" in fidelity.format_table(summary).splitlines()[0]


def test_unknown_floor_is_one_line(tiny_dirs, tmp_path):
    dataset = tmp_path / "data.json"
    dataset.write_text(json.dumps(ITEMS))
    with pytest.raises(SystemExit, match="unknown noise floor"):
        fidelity.main(["--dataset", str(dataset), "--floors", "kv=int3"])


def test_an_adapter_is_scored_beside_the_same_variant_without(tiny_dirs, tmp_path, capsys):
    from blendrag.adapter import ReuseAdapter

    dataset, out = tmp_path / "data.json", tmp_path / "fid.json"
    dataset.write_text(json.dumps(ITEMS))
    adapter = ReuseAdapter(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
    adapter.save(tmp_path / "a.safetensors", "tiny")
    argv = [
        "--dataset",
        str(dataset),
        "--variants",
        "full;preview@0.5;preview@1.0",
        "--model",
        str(tiny_dirs["llama"]),
    ]
    argv += ["--kv-store", "memory", "--max-new-tokens", "4", "--ref-cache", str(tmp_path / "refs")]
    assert fidelity.main([*argv, "--adapter", str(tmp_path / "a.safetensors"), "--out", str(out)]) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["summary"]}
    assert list(rows) == ["full", "preview@0.5", "preview@1.0", "preview+adapter@0.5", "preview+adapter@1.0"]
    assert rows["preview+adapter@1.0"]["kl_first"] < 1e-6  # every token recomputed: no adapter left
    assert rows["preview+adapter@0.5"]["kl_first"] != rows["preview@0.5"]["kl_first"]


def test_parts_merge_into_the_whole_run_with_paired_differences(tiny_dirs, tmp_path, capsys):
    from eval import merge

    dataset = tmp_path / "data.json"
    dataset.write_text(json.dumps(ITEMS))
    argv = ["--dataset", str(dataset), "--variants", "reuse;preview@0.5", "--model", str(tiny_dirs["llama"])]
    argv += ["--kv-store", "memory", "--max-new-tokens", "4", "--ref-cache", str(tmp_path / "refs")]
    for skip, n, name in [(0, 2, "whole"), (1, 1, "b"), (0, 1, "a"), (0, 2, "other")]:
        extra = ["--variants", "reuse"] if name == "other" else []
        assert (
            fidelity.main([*argv, *extra, "--skip", str(skip), "--n", str(n), "--out", str(tmp_path / name)])
            == 0
        )
    whole = json.loads((tmp_path / "whole").read_text())
    out = tmp_path / "merged.json"
    assert (
        merge.main(
            [str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(out), "--pair", "reuse;preview@0.5"]
        )
        == 0
    )
    merged = json.loads(out.read_text())
    assert [r["question"] for r in merged["records"]] == [r["question"] for r in whole["records"]]
    for row, expected in zip(merged["summary"], whole["summary"], strict=True):
        assert row["name"] == expected["name"] and row["kl_first"] == pytest.approx(expected["kl_first"])
    (diff,) = merged["paired"]
    kl = {row["name"]: row["kl_first"] for row in whole["summary"]}
    assert diff["kl_first"] == pytest.approx(kl["reuse"] - kl["preview@0.5"])
    assert "reuse - preview@0.5 (2 questions" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="overlap"):
        merge.main([str(tmp_path / "whole"), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="different settings: variants"):
        merge.main([str(tmp_path / "other"), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--pair reuse;full"):
        merge.main([str(tmp_path / "a"), "--pair", "reuse;full"])


def test_a_run_with_other_settings_joins_beside_for_pairs(tiny_dirs, tmp_path, capsys):
    """Chunks precomputed after the prompt prefix, beside the same questions' run without: its
    variants are named prefix:NAME and pair with the main run's, question by question."""
    from eval import merge

    dataset = tmp_path / "data.json"
    dataset.write_text(json.dumps(ITEMS))
    argv = ["--dataset", str(dataset), "--variants", "preview@0.5", "--model", str(tiny_dirs["llama"])]
    argv += ["--kv-store", "memory", "--max-new-tokens", "4", "--ref-cache", str(tmp_path / "refs")]
    for context in ("none", "prefix"):
        out = ["--out", str(tmp_path / context), "--n", "2"]
        assert fidelity.main([*argv, *out, "--chunk-context", context]) == 0
    assert fidelity.main([*argv, "--n", "1", "--out", str(tmp_path / "one")]) == 0
    kl = {c: json.loads((tmp_path / c).read_text())["summary"][0]["kl_first"] for c in ("none", "prefix")}
    assert kl["none"] != kl["prefix"]
    out = tmp_path / "joined.json"
    beside = ["--beside", f"prefix={tmp_path / 'prefix'}"]
    pair = ["--pair", "prefix:preview@0.5;preview@0.5", "--out", str(out)]
    assert merge.main([str(tmp_path / "none"), *beside, *pair]) == 0
    joined = json.loads(out.read_text())
    assert [row["name"] for row in joined["summary"]] == ["preview@0.5", "prefix:preview@0.5"]
    assert joined["paired"][0]["kl_first"] == pytest.approx(kl["prefix"] - kl["none"])
    assert joined["settings"]["beside:prefix"]["chunk_context"] == "prefix"
    with pytest.raises(SystemExit, match="other questions"):
        merge.main([str(tmp_path / "one"), *beside])
    with pytest.raises(SystemExit, match="expected LABEL=PART"):
        merge.main([str(tmp_path / "none"), "--beside", str(tmp_path / "prefix")])
