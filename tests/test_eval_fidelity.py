"""The teacher-forced fidelity screen (eval.fidelity) on a tiny random-weight model."""

import json

from blendrag import BlendConfig
from eval import fidelity
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
    summary = fidelity.summarize_all(again, variants)
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
