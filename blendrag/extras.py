"""The optional layers over the engine (``pip install 'blendrag[EXTRA]'``) and the one-line error
that names the extra when one is missing."""

from __future__ import annotations

from .errors import BlendRAGError


class MissingExtra(BlendRAGError, ImportError):
    """A feature was used whose optional dependencies are not installed."""


def missing_extra(extra: str, feature: str, err: ImportError) -> MissingExtra:
    """The error for ``feature`` failing to import ``err.name``, which ``extra`` installs."""
    return MissingExtra(
        f"{feature} needs the '{extra}' extra ({err.name or err} is not installed): "
        f"pip install 'blendrag[{extra}]'"
    )
