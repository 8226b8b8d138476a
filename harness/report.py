"""What a report's JSON says about how it was run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options, paths as strings (JSON has no path type)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_json(path: Path, report: Any, indent: int = 1) -> None:
    """Write a report's JSON to ``path``, making its folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=indent))
