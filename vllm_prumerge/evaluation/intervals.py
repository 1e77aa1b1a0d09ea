"""95% intervals for comparing a mode's answers with another's on the same items."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

Z95 = 1.96


def paired_delta(values: Sequence[float], baseline: Sequence[float]) -> dict[str, Any] | None:
    """Mean per-item difference to `baseline` with its 95% normal-approximation interval (None
    for fewer than 2 items)."""
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    if len(diffs) < 2:
        return None
    centre, half = statistics.fmean(diffs), Z95 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": centre, "ci95_low": centre - half, "ci95_high": centre + half}


def wilson(successes: int, total: int) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (None for no trials)."""
    if total == 0:
        return None
    z, p = Z95, successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))
