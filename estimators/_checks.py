"""Input validation shared by the estimator modules (private).

Every check raises `tailmon.errors.InputError` with a message of the form
"confidence must be in (0, 1), got 1.5", so the CLI can report it as one line.
"""

from __future__ import annotations

import math

import numpy as np

from tailmon.errors import InputError


def check_confidence(confidence: float) -> float:
    """Return `confidence` as a float after checking it lies in (0, 1)."""
    try:
        c = float(confidence)
    except (TypeError, ValueError):
        raise InputError(f"confidence must be a number in (0, 1), got {confidence!r}") from None
    if not 0.0 < c < 1.0:  # also rejects nan
        raise InputError(f"confidence must be in (0, 1), got {confidence!r}")
    return c


def check_fraction(value: float, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """Return `value` as a float after checking it lies in [0, 1] (ends optionally open)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in [0, 1], got {value!r}") from None
    lo_ok = v > 0.0 if low_open else v >= 0.0
    hi_ok = v < 1.0 if high_open else v <= 1.0
    if not (lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise InputError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_count(n: int, name: str, *, minimum: int = 1) -> int:
    """Return `n` as an int after checking it is an integer >= minimum."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        if isinstance(n, (float, np.floating)) and float(n).is_integer():
            n = int(n)
        else:
            raise InputError(f"{name} must be an integer >= {minimum}, got {n!r}")
    if n < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {n!r}")
    return int(n)


def check_volume(volume: float, name: str = "volume") -> float:
    """Return `volume` as a float after checking it is finite and >= 0."""
    try:
        v = float(volume)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a finite number >= 0, got {volume!r}") from None
    if not (math.isfinite(v) and v >= 0.0):
        raise InputError(f"{name} must be a finite number >= 0, got {volume!r}")
    return v


def as_1d(values, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """Return `values` as a 1-D float64 array, rejecting other shapes and non-numbers."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a 1-D array of numbers") from None
    if arr.ndim != 1:
        raise InputError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise InputError(f"{name} must not be empty")
    return arr


def check_scores(h, name: str = "h") -> np.ndarray:
    """Return harm scores as a 1-D float array after checking they are finite and in [0, 1]."""
    arr = as_1d(h, name)
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        first = arr[bad][0]
        raise InputError(
            f"{name} must hold scores in [0, 1], got {int(bad.sum())} outside (e.g. {first!r})"
        )
    return arr


def check_probabilities(p, name: str) -> np.ndarray:
    """Return probabilities as a 1-D float array after checking they are finite and in [0, 1]."""
    return check_scores(p, name)
