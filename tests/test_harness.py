"""The shared harness (datasets, variants, answers against gold, summaries, timing) and the
command line of every eval/ and bench/ script."""

import importlib
import json
import math
import time
from pathlib import Path

import pytest

from harness.answers import best_em, best_f1, exact_match, f1_score, normalize_answer
from harness.data import load_prompts, write_corpus
from harness.stats import summarize
from harness.timing import Timed, time_ms
from harness.variants import Variant, parse_variants

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    f"{path.parent.name}.{path.stem}"
    for package in ("eval", "bench")
    for path in (ROOT / package).glob("*.py")
    if 'if __name__ == "__main__"' in path.read_text()
)


def test_parse_variants():
    assert parse_variants("full;reuse; deviation,first_k=4@0.15") == [
        Variant("full", "full"),
        Variant("reuse", "reuse"),
        Variant("deviation,first_k=4@0.15", "blend", 0.15, "deviation,first_k=4"),
    ]
    with pytest.raises(ValueError, match="needs a ratio"):
        parse_variants("deviation")


def test_normalize_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in   Paris! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    # Articles are whole words only: "theater" and "anna" keep their letters.
    assert normalize_answer("Theater of Anna") == "theater of anna"


def test_exact_match_after_normalization():
    assert exact_match("The Beatles.", "beatles") == 1.0
    assert exact_match("Beatles band", "beatles") == 0.0


def test_f1_partial_overlap():
    # pred: {exeter, college, oxford}, gold: {exeter, college}: P = 2/3, R = 1 -> F1 = 0.8
    assert f1_score("Exeter College, Oxford", "Exeter College") == pytest.approx(0.8)
    assert f1_score("Oxford", "Exeter College") == 0.0


def test_f1_counts_repeated_tokens_once_per_occurrence():
    # overlap of "paris paris" with "paris" is 1: P = 1/2, R = 1 -> 2/3
    assert f1_score("paris paris", "paris") == pytest.approx(2 / 3)


def test_f1_empty_answers():
    assert f1_score("", "the") == 1.0  # both normalize to nothing
    assert f1_score("", "Paris") == 0.0


def test_best_over_golds_takes_the_best_match():
    golds = ["Exeter College", "Oxford University"]
    assert best_f1("University of Oxford", golds) == pytest.approx(0.8)
    assert best_em("exeter college", golds) == 1.0
    assert best_em("Cambridge", golds) == 0.0
    assert best_f1("anything", []) == 0.0


def test_summarize_mean_and_percentiles():
    stats = summarize([4.0, 1.0, 3.0, 2.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert stats["mean"] == pytest.approx(5.5)
    assert stats["p50"] == pytest.approx(5.5)
    assert stats["p90"] == pytest.approx(9.1)  # 9 + 0.1 * (10 - 9), linear interpolation
    assert summarize([2.0]) == {"mean": 2.0, "p50": 2.0, "p90": 2.0}
    assert all(math.isnan(v) for v in summarize([]).values())


def test_summarize_other_percentiles():
    stats = summarize([float(x) for x in range(1, 11)], (50, 99))
    assert list(stats) == ["mean", "p50", "p99"]
    assert stats["p99"] == pytest.approx(9.91)  # 9 + 0.91 * (10 - 9)
    assert list(summarize([], (99,))) == ["mean", "p99"]


ITEMS = [
    {
        "question": "q0",
        "answers": ["a"],
        "ctxs": [{"title": "T", "text": "one"}, {"title": "", "text": "two"}],
    },
    {
        "question": "q1",
        "answers": ["b"],
        "ctxs": [{"title": "", "text": "two"}, {"title": "U", "text": "three"}],
    },
]


def _docs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_corpus_every_passage_or_each_text_once(tmp_path):
    every = tmp_path / "every.jsonl"
    assert write_corpus(ITEMS, every, limit=3) == 3
    assert _docs(every) == [
        {"id": "q0-p0", "text": "T\none"},
        {"id": "q0-p1", "text": "two"},
        {"id": "q1-p0", "text": "two"},  # repeated passages stay: the indexer shares their KV
    ]
    distinct = tmp_path / "sub" / "distinct.jsonl"
    assert write_corpus(ITEMS, distinct, distinct=True) == 3
    docs = _docs(distinct)
    assert [d["text"] for d in docs] == ["T\none", "two", "U\nthree"]
    # Ids depend on the text alone: fewer questions name the same passages alike.
    write_corpus(ITEMS[:1], tmp_path / "first.jsonl", distinct=True)
    assert _docs(tmp_path / "first.jsonl") == docs[:2]


def test_load_prompts_takes_the_first_passages_as_chunks(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ITEMS))
    assert load_prompts(path, 1, top_k=1) == [(["T\none"], "q0")]
    path.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_prompts(path, None, 1)


def test_time_ms_discards_the_warmup_and_syncs_around_each_call():
    calls, syncs = [], []
    times = time_ms(lambda: calls.append(len(syncs)), warmup=2, repeats=3, sync=lambda: syncs.append(1))
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert calls == [0, 0, 1, 3, 5]  # warm-up unsynced; then one sync before each timed call
    assert len(syncs) == 6


def test_timed_adds_up_the_time_spent_in_its_calls():
    timed = Timed(lambda s: time.sleep(s) or s)
    assert timed(0.01) == 0.01 and timed(0.02) == 0.02
    assert 0.03 <= timed.seconds < 1.0


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_script_runs_as_a_module(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module}")


def test_the_scripts_are_all_there():
    assert {"eval.quality", "eval.fidelity", "bench.prefill", "bench.load", "bench.kv_tiers"} <= set(SCRIPTS)
