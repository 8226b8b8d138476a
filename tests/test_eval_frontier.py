"""eval.frontier: speedups and KL from a fidelity report, and the plot."""

import json

import pytest

from eval import frontier


def record(full_s: float, blend_s: float, kl: float) -> dict:
    return {
        "results": {
            "full": {"ttft_s": full_s, "kl_first": 0.0},
            "preview@0.15": {"ttft_s": blend_s, "kl_first": kl},
            "kv=fp8": {"ttft_s": full_s, "kl_first": 0.02},
        }
    }


def test_speedup_is_the_median_per_question_ratio_and_kl_the_mean(tmp_path, capsys):
    records = [record(4.0, 1.0, 0.01), record(6.0, 1.0, 0.03), record(10.0, 1.0, 0.05)]
    assert frontier.points(records) == {"preview@0.15": (6.0, pytest.approx(0.03))}
    report = tmp_path / "fid.json"
    report.write_text(json.dumps({"records": records, "summary": [{"name": "kv=fp8", "kl_first": 0.02}]}))
    out = tmp_path / "img" / "frontier.png"
    assert frontier.main([str(report), "--out", str(out), "--label", "preview=blend"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "6.00x  KL 0.0300" in capsys.readouterr().out


def test_a_run_beside_is_timed_against_its_own_full(tmp_path, capsys):
    main, other = tmp_path / "main.json", tmp_path / "other.json"
    main.write_text(json.dumps({"records": [record(4.0, 1.0, 0.01)], "summary": []}))
    other.write_text(json.dumps({"records": [record(9.0, 1.0, 0.02)], "summary": []}))
    out = tmp_path / "frontier.png"
    assert frontier.main([str(main), "--beside", f"sink={other}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "preview@0.15" in printed and "4.00x  KL 0.0100" in printed
    assert "sink:preview@0.15" in printed and "9.00x  KL 0.0200" in printed
    with pytest.raises(SystemExit, match="expected LABEL=REPORT"):
        frontier.main([str(main), "--beside", str(other), "--out", str(out)])


def test_a_report_without_full_is_one_line(tmp_path):
    report = tmp_path / "fid.json"
    report.write_text(json.dumps({"records": [{"results": {"reuse": {}}}], "summary": []}))
    with pytest.raises(SystemExit, match="no full variant"):
        frontier.main([str(report), "--out", str(tmp_path / "x.png")])
