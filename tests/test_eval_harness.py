import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from blendrag.stats import GenerationStats
from eval import quality
from harness.data import write_corpus
from harness.runner import Backend

FULL_LOGITS = torch.tensor([2.0, 0.0, 0.0])
FLAT_LOGITS = torch.zeros(3)
# KL(softmax([2,0,0]) || uniform) = ln 3 - H(softmax([2,0,0]))
_P = torch.softmax(FULL_LOGITS.double(), dim=0)
KL_FLAT = math.log(3) + float(torch.sum(_P * _P.log()))


@dataclass(frozen=True)
class FakeConfig:
    recompute_ratio: float = 0.15
    check_layer: int = 1
    selector: str = "deviation"
    gradual_layers: int = 0
    first_k: int = 0

    def __post_init__(self) -> None:
        if self.selector not in ("preview", "deviation", "random"):
            raise ValueError(f"unknown selector {self.selector!r}")


class FakeEngine:
    """Deterministic stand-in: quality and TTFT depend only on mode and recompute ratio.

    full/prefix/blend with ratio >= 0.15 answer "Paris"; blend below that answers "Paris France";
    reuse answers "London". TTFT: 0.4 s for full/prefix, 0.1 s for reuse, 0.1 + 0.5 * ratio for blend.
    """

    def __init__(self) -> None:
        self.stored: set[str] = set()
        self.log: list[tuple[str, str, list[str]]] = []

    def precompute(self, texts: list[str]) -> int:
        new = [t for t in texts if t not in self.stored]
        self.stored.update(new)
        self.log.append(("precompute", "", list(texts)))
        return len(new)

    def _ratio(self, mode: str, recompute_ratio: float | None, config: FakeConfig | None) -> float:
        if mode == "blend":
            assert config is not None and config.recompute_ratio == recompute_ratio
            return config.recompute_ratio
        assert config is None
        return 0.0 if mode == "reuse" else 1.0

    def _run(self, chunks, question, mode, recompute_ratio, config):
        ratio = self._ratio(mode, recompute_ratio, config)
        if mode != "full":
            assert all(c in self.stored for c in chunks), "chunk KV used before precompute"
        self.log.append(("call", mode, list(chunks)))
        ttft = {"full": 0.4, "prefix": 0.4, "reuse": 0.1}.get(mode, 0.1 + 0.5 * ratio)
        hits = 0 if mode == "full" else len(chunks)
        stats = GenerationStats(mode, 100, round(100 * ratio), ratio, hits, 0, 0.0, ttft, 2, 0.01)
        if mode == "reuse":
            return "London", FLAT_LOGITS, stats
        return ("Paris France" if ratio < 0.15 else "Paris\nThe capital."), FULL_LOGITS.clone(), stats

    def generate(self, chunks, question, mode="blend", recompute_ratio=None, config=None, **kwargs):
        text, logits, stats = self._run(chunks, question, mode, recompute_ratio, config)
        return SimpleNamespace(text=text, token_ids=[1, 2], stats=stats, first_logits=logits)


@pytest.fixture
def dataset(tmp_path):
    items = [
        {
            "question": f"Capital of France {i}?",
            "answers": ["Paris", "Paris, France"],
            "ctxs": [{"title": f"T{i}", "text": f"text {i}a"}, {"title": "", "text": f"text {i}b"}]
            + [{"title": "X", "text": "unused"}],
        }
        for i in range(3)
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(items))
    return path


def _run_main(args, engine):
    return quality.main(args, backend_factory=lambda *_: Backend(engine, FakeConfig()))


def _reject_constant(name):
    raise AssertionError(f"non-standard JSON constant {name}")


def test_harness_end_to_end(tmp_path, dataset, capsys):
    engine = FakeEngine()
    out, plot = tmp_path / "res" / "q.json", tmp_path / "res" / "q.png"
    args = ["--dataset", str(dataset), "--n", "2", "--top-k", "2", "--ratios", "0.1,0.3"]
    args += ["--configs", "deviation;random", "--out", str(out), "--plot", str(plot)]
    assert _run_main(args, engine) == 0

    report = json.loads(out.read_text(), parse_constant=_reject_constant)
    assert set(report) == {"settings", "complete", "summary", "records"} and report["complete"] is True
    blends = [f"blend/{s}@{r}" for s in ("deviation", "random") for r in (0.1, 0.3)]
    names = ["full", "prefix", "reuse", *blends]
    assert [row["name"] for row in report["summary"]] == names

    assert len(report["records"]) == 2
    record = report["records"][0]
    assert record["question"] == "Capital of France 0?" and record["gold"] == ["Paris", "Paris, France"]
    assert set(record["results"]) == set(names)
    assert set(record["results"]["full"]) == {
        "answer", "ttft_s", "n_tokens", "n_recomputed", "recomputed_frac", "cache_hits", "cache_misses",
        "f1", "em", "rouge_l", "same_as_full", "f1_vs_full", "kl_vs_full",
    }  # fmt: skip
    assert record["results"]["full"]["answer"] == "Paris"  # first line only

    rows = {row["name"]: row for row in report["summary"]}
    assert rows["full"]["f1"] == 1.0 and rows["full"]["agree_full"] == 1.0 and rows["full"]["speedup"] == 1.0
    assert rows["full"]["kl_full"] == 0.0 and rows["full"]["recomputed_frac"] == 1.0
    assert rows["reuse"]["f1"] == 0.0 and rows["reuse"]["agree_full"] == 0.0
    assert rows["reuse"]["speedup"] == pytest.approx(4.0) and rows["reuse"]["speedup_p50"] == pytest.approx(
        4.0
    )
    assert rows["reuse"]["kl_full"] == pytest.approx(KL_FLAT)
    low = rows["blend/deviation@0.1"]
    assert low["agree_full"] == 0.0 and low["f1_full"] == pytest.approx(2 / 3)
    assert low["em"] == 1.0  # "Paris France" matches the second gold after normalization
    assert low["recomputed_frac"] == pytest.approx(0.1) and low["ttft_p90_s"] == pytest.approx(0.15)
    assert rows["blend/random@0.3"]["agree_full"] == 1.0 and rows["blend/random@0.3"]["selector"] == "random"

    for png in (plot, tmp_path / "res" / "q_fidelity.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split()[:3] == ["variant", "n", "F1"]
    assert [line.split()[0] for line in table[1:]] == names
    assert len({len(line) for line in table}) == 1  # aligned columns


def test_resume_runs_only_the_questions_an_interrupted_run_did_not_finish(tmp_path, dataset):
    out = tmp_path / "q.json"
    base = ["--dataset", str(dataset), "--top-k", "2", "--ratios", "0.3", "--out", str(out)]
    first = FakeEngine()
    assert _run_main([*base, "--n", "1"], first) == 0
    before = json.loads(out.read_text())

    second = FakeEngine()
    assert _run_main([*base, "--n", "3", "--resume"], second) == 0
    report = json.loads(out.read_text())
    assert report["complete"] and report["records"][0] == before["records"][0]
    assert [r["question"] for r in report["records"]] == [f"Capital of France {i}?" for i in range(3)]
    timed = {tuple(chunks) for kind, mode, chunks in second.log if kind == "call" and mode == "full"}
    # The warm-up runs once on the last question; question 0 is never run again.
    assert ("T0\ntext 0a", "text 0b") not in timed
    assert report["summary"][0]["n"] == 3

    with pytest.raises(SystemExit, match="other settings.*ratios"):
        _run_main([*base[:-4], "--ratios", "0.1", "--out", str(out), "--resume"], FakeEngine())


def test_chunks_are_top_k_with_titles_and_precomputed_first(dataset):
    engine = FakeEngine()
    args = ["--dataset", str(dataset), "--n", "2", "--top-k", "2", "--methods", "reuse"]
    assert _run_main(args, engine) == 0
    first_call = next(i for i, entry in enumerate(engine.log) if entry[0] == "call")
    assert [entry[0] for entry in engine.log[:first_call]] == ["precompute", "precompute"]
    assert engine.log[0][2] == ["T0\ntext 0a", "text 0b"]
    assert {tuple(entry[2]) for entry in engine.log if entry[0] == "call"} == {
        ("T0\ntext 0a", "text 0b"),
        ("T1\ntext 1a", "text 1b"),
    }


def test_full_always_runs_as_reference(dataset, capsys):
    engine = FakeEngine()
    args = ["--dataset", str(dataset), "--n", "1", "--methods", "blend", "--ratios", "0.3"]
    assert _run_main(args, engine) == 0
    modes = {entry[1] for entry in engine.log if entry[0] == "call"}
    assert modes == {"full", "blend"}
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()[1:]] == [
        "full",
        "blend/preview@0.3",  # the default config
    ]


def test_unknown_method_is_a_clean_error(dataset):
    with pytest.raises(SystemExit, match="unknown method"):
        _run_main(["--dataset", str(dataset), "--methods", "full,turbo"], FakeEngine())


def test_malformed_dataset_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(SystemExit, match="expected a JSON list"):
        _run_main(["--dataset", str(bad)], FakeEngine())


def test_bad_selector_fails_before_any_engine_work(dataset):
    engine = FakeEngine()
    with pytest.raises(SystemExit, match="unknown selector 'bogus'"):
        _run_main(["--dataset", str(dataset), "--configs", "deviation;bogus"], engine)
    assert engine.log == []


def test_retrieve_mode_indexes_the_passages_once_and_retrieves_per_question(tiny_engine, tmp_path):
    from eval.retrieve import retrieved_chunks

    items = [
        {
            "question": "Which river flows through the Quillon valley?",
            "answers": ["Sarn"],
            "ctxs": [
                {"title": "Quillon valley", "text": "The river Sarn flows through the Quillon valley."},
                {"title": "Harbour", "text": "The harbour of Tessaline was rebuilt in 1921."},
            ],
        },
        {
            "question": "When was the harbour of Tessaline rebuilt?",
            "answers": ["1921"],
            "ctxs": [
                {"title": "Harbour", "text": "The harbour of Tessaline was rebuilt in 1921."},
                {"title": "Bells", "text": "The chapel bells were cast in Lyon."},
            ],
        },
    ]
    assert write_corpus(items, tmp_path / "c.jsonl", distinct=True) == 3  # the shared passage once
    source = retrieved_chunks(tiny_engine, items, tmp_path / "index", top_k=2)
    assert "Sarn" in source(items[0])[0]
    assert "1921" in source(items[1])[0]
    assert all(tiny_engine.chunk_kv.contains(c) for item in items for c in source(item))
