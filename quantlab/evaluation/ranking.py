"""Rank correlation (Spearman, Kendall tau-b) between two scorings of the same layers."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import numpy as np


def _average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN if either side is constant."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denominator if denominator > 0 else math.nan


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (tie-corrected); NaN if either side is constant."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(len(x), k=1)
    concordance = float((dx * dy)[upper].sum())
    pairs_x = float(np.abs(dx[upper]).sum())
    pairs_y = float(np.abs(dy[upper]).sum())
    denominator = math.sqrt(pairs_x * pairs_y)
    return concordance / denominator if denominator > 0 else math.nan


def ranking_agreement(proxy: Mapping[str, float], full: Mapping[str, float], *, top_k: int = 5) -> Dict[str, float]:
    """How well a cheap per-layer score ranks layers like the expensive one.

    Both map layer name -> sensitivity score (higher = more sensitive); only
    layers present in both are compared.

    Returns:
        ``spearman``, ``kendall`` (tau-b), ``top_k_overlap`` (fraction of the full
        ranking's ``top_k`` layers that the proxy also puts in its ``top_k``) and
        ``layers`` (how many were compared).
    """
    common = [name for name in full if name in proxy]
    if len(common) < 2:
        return {"spearman": math.nan, "kendall": math.nan, "top_k_overlap": math.nan, "layers": float(len(common))}
    a = [proxy[n] for n in common]
    b = [full[n] for n in common]
    k = min(top_k, len(common))
    top_proxy = set(sorted(common, key=lambda n: -proxy[n])[:k])
    top_full = set(sorted(common, key=lambda n: -full[n])[:k])
    return {
        "spearman": spearman(a, b),
        "kendall": kendall_tau_b(a, b),
        "top_k_overlap": len(top_proxy & top_full) / k,
        "layers": float(len(common)),
    }
