"""The selection-bound screen (eval.rankings) on a tiny random-weight model."""

import json

import pytest
import torch
from test_eval_fidelity import ITEMS

from blendrag import BlendConfig
from eval import fidelity, rankings
from harness.runner import Backend
from harness.variants import parse_variants


def chunks_of(item):
    return [f"{c['title']}\n{c['text']}" for c in item["ctxs"]]


def test_measurements_hold_what_the_rankings_assume(tiny_engine):
    item = ITEMS[0]
    m = rankings.measurements(tiny_engine, chunks_of(item), item["question"])
    prompt = tiny_engine.prompt_format.build(chunks_of(item), item["question"])
    n_layers, n = tiny_engine.model.args.n_layers, len(prompt.ids)
    assert {k: tuple(v.shape) for k, v in m.items()} == dict.fromkeys(m, (n_layers, n))
    # Attention rows are weights: each layer's row sums to one.
    for key in ("reuse_attention", "full_attention"):
        torch.testing.assert_close(m[key].sum(1), torch.ones(n_layers))
    # The prefix is reused exactly (up to float rounding), the chunks are not.
    prefix = len(prompt.prefix)
    assert m["kv_error"][:, :prefix].max() < 1e-8
    assert m["kv_error"][:, prefix : prompt.suffix_start].max() > 1e-4


def test_the_preview_ranking_is_the_engines_own_preview(tiny_engine, tmp_path):
    """Built from the measurements, the ``preview`` ranking blends exactly like the engine's
    default selector: proof that the rankings really drive the engine's selection."""
    backend = Backend(tiny_engine, BlendConfig())
    records = rankings.evaluate(backend, ITEMS, ["preview", "oracle_error"], [0.3], 3, 8, tmp_path)
    own = fidelity.evaluate(backend, ITEMS, parse_variants("preview@0.3"), 3, 8, tmp_path)
    for ranked, engine_run in zip(records, own, strict=True):
        a, b = ranked["results"]["preview@0.3"], engine_run["results"]["preview@0.3"]
        assert a["first_miss"] == b["first_miss"]
        assert a["kl_first"] == pytest.approx(b["kl_first"], abs=1e-6)
    assert set(records[0]["results"]) == {"preview@0.3", "oracle_error@0.3"}


def test_main_writes_the_table_and_refuses_unknown_rankings(tiny_dirs, tmp_path, capsys):
    dataset, out = tmp_path / "data.json", tmp_path / "rankings.json"
    dataset.write_text(json.dumps(ITEMS))
    argv = ["--dataset", str(dataset), "--model", str(tiny_dirs["llama"]), "--kv-store", "memory"]
    argv += ["--max-new-tokens", "4", "--ref-cache", str(tmp_path / "refs"), "--ratios", "0.2,1"]
    assert rankings.main([*argv, "--rankings", "oracle_weighted", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert [row["name"] for row in summary] == ["oracle_weighted@0.2", "oracle_weighted@1"]
    assert summary[1]["identical"] == 1.0  # every chunk token recomputed: full prefill
    assert "oracle_weighted@0.2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown ranking"):
        rankings.main([*argv, "--rankings", "preview,psychic"])
