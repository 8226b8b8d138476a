"""eval.tune_prompts: an adapter's training prompts rebuilt from its card; the bundled card."""

import json
from pathlib import Path

import pytest

from blendrag.adapter import ReuseAdapter
from eval import tune_prompts

ADAPTERS = Path(__file__).resolve().parents[1] / "blendrag" / "adapters"


def test_prompts_come_from_their_files_in_the_cards_order(tmp_path, capsys):
    for name in ("a.json", "b.json"):
        items = [{"question": f"{name} {i}", "ctxs": [{"text": "t"}]} for i in range(3)]
        (tmp_path / name).write_text(json.dumps(items))
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"prompts": [["b.json", 2], ["a.json", 0], ["b.json", 0]]}))
    out = tmp_path / "out" / "prompts.json"
    tune_prompts.main([str(card), "--data-dir", str(tmp_path), "--out", str(out)])
    assert [p["question"] for p in json.loads(out.read_text())] == ["b.json 2", "a.json 0", "b.json 0"]
    card.write_text(json.dumps({"prompts": [["missing.json", 0]]}))
    with pytest.raises(SystemExit) as exit_:
        tune_prompts.main([str(card), "--data-dir", str(tmp_path), "--out", str(out)])
    assert exit_.value.code == 2 and "missing.json" in capsys.readouterr().err


def test_the_bundled_adapter_never_saw_the_held_out_questions():
    card = json.loads((ADAPTERS / "SmolLM2-135M-Instruct.json").read_text())
    held_out = {"musique_dev.json": range(50), "squad_dev.json": range(100)}
    assert not [p for p in card["prompts"] if p[1] in held_out[p[0]]]
    assert len({tuple(p) for p in card["prompts"]}) == len(card["prompts"])
    assert ReuseAdapter.load(ADAPTERS / card["adapter"]).n_tokens == card["header_vectors"]
