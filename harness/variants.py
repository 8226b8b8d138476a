"""The variants a run compares: a prefill mode, plus recompute ratio and config spec for blend;
and the command-line forms that name them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

METHODS = ("full", "prefix", "reuse", "blend")
REFERENCE = "full"


@dataclass(frozen=True)
class Variant:
    """One column of the results: a prefill mode, plus ratio and selector for blend."""

    name: str
    mode: str
    ratio: float | None = None
    selector: str | None = None  # a config spec: "preview" or "deviation,check_layer=1,first_k=4"


def parse_spec(spec: str | None) -> dict[str, Any]:
    """``"attention,check_layer=2"`` -> ``{"selector": "attention", "check_layer": 2}``."""
    overrides: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            overrides["selector"] = key
            continue
        try:
            overrides[key] = int(value)
        except ValueError:
            overrides[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    return overrides


def build_variants(
    methods: Sequence[str], ratios: Sequence[float], selectors: Sequence[str]
) -> list[Variant]:
    """Reference first (every other variant is compared with it), then the methods in the given order."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    variants = [Variant(REFERENCE, REFERENCE)]
    for method in dict.fromkeys(methods):
        if method == "blend":
            variants += [Variant(f"blend/{s}@{r:g}", "blend", r, s) for s in selectors for r in ratios]
        elif method != REFERENCE:
            variants.append(Variant(method, method))
    return variants


def parse_variants(text: str) -> list[Variant]:
    """``"full;reuse;deviation@0.15;attention,check_layer=2@0.3"`` -> variants."""
    variants = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if part in ("full", "reuse", "prefix"):
            variants.append(Variant(part, part))
            continue
        spec, sep, ratio = part.rpartition("@")
        if not sep:
            raise ValueError(f"blend variant {part!r} needs a ratio: SPEC@RATIO")
        variants.append(Variant(part, "blend", float(ratio), spec))
    return variants


def name_list(text: str) -> list[str]:
    """A comma-separated option (``--methods full,blend``)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    """A comma-separated option of numbers (``--ratios 0.05,0.15``)."""
    return [float(x) for x in name_list(text)]
