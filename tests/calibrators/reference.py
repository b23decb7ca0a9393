"""Plain-loop reference implementations, written independently of quantlab.calibrators.

They follow pytorch-quantization's ``calib/histogram.py`` line for line where it
matters (np.digitize level mapping, Counter-based per-level non-empty counting,
scipy-style entropy) and favour obviousness over speed. Only numpy is used
(scipy may be missing, so ``entropy`` is re-implemented here).
"""
from __future__ import annotations

from collections import Counter

import numpy as np


def scipy_entropy(pk, qk):
    """``scipy.stats.entropy(pk, qk)``: normalize both, sum of ``rel_entr``.

    rel_entr(x, y) = x*log(x/y) for x>0, y>0; 0 for x==0, y>=0; inf otherwise.
    A zero-sum ``qk`` gives NaN, exactly as scipy does (0/0).
    """
    pk = np.asarray(pk, dtype=np.float64)
    qk = np.asarray(qk, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pk = pk / np.sum(pk)
        qk = qk / np.sum(qk)
        terms = np.where(
            (pk > 0) & (qk > 0),
            pk * np.log(pk / qk),
            np.where((pk == 0) & (qk >= 0), 0.0, np.inf),
        )
        # NaN inputs (0/0 normalization) stay NaN, as in scipy.
        terms = np.where(np.isnan(pk) | np.isnan(qk), np.nan, terms)
    return float(np.sum(terms))


def entropy_reference(counts, bin_width, num_bits=8, start_bin=128, stride=1, nan_as_inf=True):
    """pytorch-quantization's ``_compute_amax_entropy`` as a plain numpy loop.

    Args:
        nan_as_inf: scipy returns NaN when the first ``i`` bins are all empty
            (q sums to 0) and numpy's argmin then *prefers* NaN. quantlab scores
            such candidates inf instead; True applies the same rule here, False
            keeps the raw reference behaviour.

    Returns:
        (amax, thresholds, divergences) as numpy values.
    """
    bins = np.array(counts, dtype=np.float64)  # a copy: the quirk below must not leak
    edges = np.arange(len(bins) + 1, dtype=np.float64) * bin_width
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1)
    divergences = []
    arguments = []
    new_density_counts = np.zeros(nbins, dtype=np.float64)
    for i in range(start_bin, len(bins) + 1, stride):
        new_density_counts.fill(0)
        space = np.linspace(0, i, num=nbins + 1)
        digitized_space = np.digitize(range(i), space) - 1
        digitized_space[bins[:i] == 0] = -1
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density_counts[digitized] += bins[idx]
        counter = Counter(digitized_space)
        for key, val in counter.items():
            if key != -1:
                new_density_counts[key] = new_density_counts[key] / val
        new_density = np.zeros(i, dtype=np.float64)
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density[idx] = new_density_counts[digitized]
        reference_density = np.array(bins[: len(digitized_space)])
        reference_density[-1] += np.sum(bins[i:])
        ent = scipy_entropy(reference_density, new_density)
        if nan_as_inf and np.isnan(ent):
            ent = np.inf
        divergences.append(ent)
        arguments.append(i)
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    amax = edges[last_argmin * stride + start_bin]
    return float(amax), np.array(arguments), divergences


def mse_reference(counts, bin_width, num_bits=8, start_bin=128, stride=1):
    """Brute force over candidates: fake-quantize every bin centre for each one.

    The loop runs over candidate amaxes (numpy over the bins inside, to stay
    fast enough for 2048-bin histograms).

    Returns:
        (amax, candidates, errors); the first minimum wins.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = len(counts)
    qmax = 2 ** (num_bits - 1) - 1
    k = np.arange(n, dtype=np.float64)
    centres = (k * bin_width + (k + 1) * bin_width) / 2
    candidates, errors = [], []
    for i in range(start_bin, n, stride):  # the bin centres, as pytorch-quantization's loop
        amax = centres[i]
        scale = amax / qmax
        quantized = np.minimum(np.round(centres / scale), qmax)  # np.round: half to even
        errors.append(float(np.sum(counts * (centres - quantized * scale) ** 2)))
        candidates.append(amax)
    errors = np.array(errors)
    return float(candidates[int(np.argmin(errors))]), np.array(candidates), errors


def percentile_reference(samples, percentile, method="inverted_cdf"):
    """numpy.percentile of the raw ``|x|`` samples."""
    return float(np.percentile(np.abs(np.asarray(samples, dtype=np.float64)), percentile, method=method))
