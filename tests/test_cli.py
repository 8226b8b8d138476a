"""The ``blendrag`` entry point: JSON output and one-line errors."""

import json

from blendrag.cli import main


def test_query_with_chunks_file_prints_one_json_object(tiny_dirs, tmp_path, capsys):
    chunks = tmp_path / "chunks.json"
    chunks.write_text(json.dumps(["Alpha is a cat.", "Beta is a dog."]))
    argv = ["query", "What is Alpha?", "--chunks-file", str(chunks), "--model", str(tiny_dirs["llama"])]
    assert main(argv + ["--mode", "blend", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"answer", "chunks", "stats", "retrieval_s"}
    assert out["stats"]["mode"] == "blend" and out["stats"]["n_generated"] <= 4


def test_bad_chunks_file_is_one_line_and_exit_2(tmp_path, capsys):
    chunks = tmp_path / "chunks.json"
    chunks.write_text('{"not": "a list"}')
    assert main(["query", "q", "--chunks-file", str(chunks)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expected a JSON list" in err and str(chunks) in err
