"""What blendrag prints on its own: progress bars for long work only, and only where they are read."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_retriever import FakeEngine
from transformers.utils import logging as hf_logging

from blendrag.retriever import Embedder, build_index

CORPUS = Path(__file__).resolve().parents[1] / "blendrag" / "samples" / "corpus"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.mark.parametrize(("progress", "shown"), [(None, False), (False, False), (True, True)])
def test_index_progress_bar_only_on_a_terminal_or_when_asked(tmp_path, capfd, embedder, progress, shown):
    """Under pytest stderr is no terminal, so the default (None) shows no bar."""
    doc = CORPUS / "calder_cup_regatta.md"
    build_index([doc], tmp_path / "index", FakeEngine(), embedder=embedder, progress=progress)
    assert ("indexing" in capfd.readouterr().err) == shown


def test_loading_the_embedder_shows_no_progress_bar(capfd):
    Embedder()
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched back on for everyone else
