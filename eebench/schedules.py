"""Learning-rate shapes shared by the training recipe and the methods' own optimisers."""

from __future__ import annotations

import math


def cosine(progress: float, high: float, low: float = 0.0) -> float:
    """Half a cosine from ``high`` (progress 0) to ``low`` (progress 1); progress is clamped to [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * progress))
