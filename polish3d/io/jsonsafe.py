"""Values as strict JSON: what ``json.dumps(..., allow_nan=False)`` accepts."""

from __future__ import annotations

import numpy as np

__all__ = ["json_safe"]


def json_safe(value):
    """``value`` as plain JSON values: dicts (keys as strings), lists, arrays and NumPy scalars
    converted, every non-finite number replaced by ``None`` (JSON has no NaN; ``json.dumps(...,
    allow_nan=False)`` holds). Other objects are returned as they are."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
