"""Continual-learning metrics computed from the matrix ``R[t, i]``.

``R`` is a T×T array-like: row ``t-1`` holds the scores after training task ``t``, column ``i-1`` the score
on task ``i``; entries that were not evaluated are ``NaN``/``None``. ``t`` always counts tasks learned
(1-based), as in the papers.

Definitions (PIECE supplementary C, Fig. 7):

- OP_t  = 1/t · Σ_{i≤t} R[t,i]                          (PIECE eq. 26)
- BWT_t = 1/t · Σ_{i<t} (R[t,i] − R[i,i])               (PIECE eq. 27; note the 1/t)
  The conventional definition (Lopez-Paz & Ranzato, GEM) divides by t−1: ``normaliser="t-1"``.
- AP_t  = 1/t · Σ_{i≤t} R[i,i]                          (PIECE Fig. 7 caption)
- FWT_t = 1/(t−1) · Σ_{2≤i≤t} (R[i−1,i] − b_i)          (GEM): needs the upper diagonal R[i−1,i] and the
  score b_i of the model before any training on task i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

BwtNormaliser = Literal["t", "t-1"]


def as_matrix(r_matrix: object) -> np.ndarray:
    """Return ``r_matrix`` as a float square matrix with ``NaN`` for missing entries."""
    arr = np.array(r_matrix, dtype=object)
    arr = np.where(arr == None, np.nan, arr).astype(float)  # noqa: E711 (elementwise None test)
    if arr.ndim != 2 or arr.shape[0] > arr.shape[1]:
        raise ValueError(f"R must be a T×T matrix (rows ≤ columns), got shape {arr.shape}")
    return arr


def _check_t(arr: np.ndarray, t: int) -> None:
    if not 1 <= t <= arr.shape[0]:
        raise ValueError(f"t must be in 1..{arr.shape[0]} (tasks learned), got {t}")


def _lower_row(arr: np.ndarray, t: int) -> np.ndarray:
    row = arr[t - 1, :t]
    if np.isnan(row).any():
        raise ValueError(f"R[{t},1..{t}] has unevaluated entries: {row.tolist()}")
    return row


def overall_performance(r_matrix: object, t: int) -> float:
    """OP_t = (1/t) Σ_{i=1..t} R[t,i] — PIECE eq. 26."""
    arr = as_matrix(r_matrix)
    _check_t(arr, t)
    return float(_lower_row(arr, t).mean())


def backward_transfer(r_matrix: object, t: int, normaliser: BwtNormaliser = "t") -> float:
    """BWT_t = (1/t) Σ_{i=1..t−1} (R[t,i] − R[i,i]) — PIECE eq. 27.

    ``normaliser="t-1"`` gives the conventional GEM definition. BWT_1 is 0 (no earlier task).
    """
    arr = as_matrix(r_matrix)
    _check_t(arr, t)
    if normaliser not in ("t", "t-1"):
        raise ValueError(f"normaliser must be 't' or 't-1', got {normaliser!r}")
    if t == 1:
        return 0.0
    row = _lower_row(arr, t)[: t - 1]
    diag = np.diag(arr)[: t - 1]
    denom = t if normaliser == "t" else t - 1
    return float((row - diag).sum() / denom)


def average_performance(r_matrix: object, t: int) -> float:
    """AP_t = (1/t) Σ_{i=1..t} R[i,i] — PIECE Fig. 7: the mean score of each task just after learning it."""
    arr = as_matrix(r_matrix)
    _check_t(arr, t)
    diag = np.diag(arr)[:t]
    if np.isnan(diag).any():
        raise ValueError(f"diagonal R[i,i] for i ≤ {t} has unevaluated entries")
    return float(diag.mean())


def forward_transfer(r_matrix: object, t: int, initial_scores: Sequence[float]) -> float | None:
    """FWT_t = 1/(t−1) Σ_{i=2..t} (R[i−1,i] − b_i) (GEM), ``b_i = initial_scores[i-1]``.

    Returns ``None`` when the needed upper-diagonal entries were not evaluated or ``t == 1``.
    """
    arr = as_matrix(r_matrix)
    _check_t(arr, t)
    if t == 1:
        return None
    upper = np.array([arr[i - 2, i - 1] for i in range(2, t + 1)])
    base = np.array([initial_scores[i - 1] for i in range(2, t + 1)], dtype=float)
    if np.isnan(upper).any() or np.isnan(base).any():
        return None
    return float((upper - base).mean())


def curves(r_matrix: object, normaliser: BwtNormaliser = "t") -> dict[str, list[float]]:
    """OP, BWT and AP after every task that has a complete lower-triangular row."""
    arr = as_matrix(r_matrix)
    done = arr.shape[0]
    return {
        "op": [overall_performance(arr, t) for t in range(1, done + 1)],
        "bwt": [backward_transfer(arr, t, normaliser) for t in range(1, done + 1)],
        "ap": [average_performance(arr, t) for t in range(1, done + 1)],
    }
