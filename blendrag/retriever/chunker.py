"""Split a document into chunks of at most N tokens of the LLM's own tokenizer.

Chunks are measured in the LLM's tokens because each chunk's KV cache is computed on its own:
the chunk length is the KV length. Boundaries come from the fast tokenizer's offset mapping, so
a chunk never ends inside a token (or inside a character a byte-level BPE spread over several
tokens) and its text is an exact substring ``document[start:end]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from blendrag.errors import BlendRAGError

DEFAULT_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offsets in the document: text == document[start:end]
    end: int
    n_tokens: int


def chunk_text(
    text: str, tokenizer, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = 0
) -> list[Chunk]:
    """Windows of ``chunk_tokens`` tokens, each starting ``chunk_tokens - overlap`` after the last."""
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise BlendRAGError(
            f"need chunk_tokens >= 1 and 0 <= overlap < chunk_tokens (got {chunk_tokens}, {overlap})"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise BlendRAGError("chunking needs a fast (Rust) tokenizer for character offsets")
    # verbose=False: documents are longer than the model's context on purpose; no length warning.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    chunks = []
    first = 0
    while first < len(offsets):
        last = _boundary(offsets, min(first + chunk_tokens, len(offsets)), floor=first + 1)
        start, end = offsets[first][0], offsets[last - 1][1]
        chunks.append(Chunk(text[start:end], start, end, last - first))
        if last == len(offsets):
            break
        first = _boundary(offsets, max(last - overlap, first + 1), floor=first + 1)
    return chunks


def _boundary(offsets: list[tuple[int, int]], i: int, floor: int) -> int:
    """The cut nearest before token ``i`` (not below ``floor``) that does not split a character.

    Byte-level BPE can spread one character over several tokens that share its offsets; cutting
    between them would make two chunks overlap on that character.
    """
    j = i
    while j > floor and not _is_cut(offsets, j):
        j -= 1
    if _is_cut(offsets, j):
        return j
    # The whole window lies inside one character's tokens: keep that run whole.
    j = i
    while not _is_cut(offsets, j):
        j += 1
    return j


def _is_cut(offsets: list[tuple[int, int]], j: int) -> bool:
    return j >= len(offsets) or offsets[j][0] >= offsets[j - 1][1]
