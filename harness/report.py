"""What a report's JSON says about how it was run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options, paths as strings (JSON has no path type)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
