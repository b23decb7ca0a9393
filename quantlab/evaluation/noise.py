"""How much of an accuracy difference is noise: n, 95% intervals and paired tests against FP32.

Pure functions (no torch, no scipy): every number here is checked in the tests
against a value computed independently.

* Proportions (top-1, top-5, agreement, next-token accuracy, probe accuracy):
  the **Wilson score interval** (:func:`wilson_interval`), which stays inside
  [0, 100] and is right at small n where the normal ("Wald") interval is not.
* Means of per-sample values (embedding cosine, the per-token NLL behind
  perplexity): the **Student t interval** of the mean (:func:`t_interval`);
  perplexity's interval is ``exp`` of the NLL interval (exp is monotone).
* Differences against FP32 on the SAME samples: the **exact McNemar test**
  (:func:`mcnemar_exact`: a two-sided binomial test on the discordant pairs,
  samples right in one model and wrong in the other) for proportions, and the
  **paired t test** (:func:`paired_t_test`) on per-sample differences for means.
  A difference whose p-value is at least 0.05 is "within noise": these samples
  cannot tell the two models apart.

Per-token values of a language model are not independent samples (tokens of one
text are correlated), so intervals over tokens are narrower than the truth; the
method string says "over tokens" where that applies.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple

#: z for a two-sided 95% interval: Phi^-1(0.975).
Z95 = 1.959963984540054
ALPHA = 0.05

WILSON = "Wilson 95%"
T_MEAN = "t 95% of the mean"
MCNEMAR = "McNemar exact (paired, vs FP32)"
PAIRED_T = "paired t (vs FP32)"


def wilson_interval(successes: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (as fractions in [0, 1]).

    Raises:
        ValueError: ``n`` < 1 or ``successes`` outside 0..n.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"Wilson interval needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p = successes / n
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


# -- Student t (no scipy: the regularized incomplete beta function, Numerical Recipes' continued fraction) ----
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile (> 0.5) of Student's t, by bisection on :func:`t_two_sided_p`."""
    tail = 2.0 * (1.0 - probability)
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_two_sided_p(mid, df) > tail:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def _mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
    """The Student t interval of the mean of ``values`` (needs n >= 2)."""
    n = len(values)
    if n < 2:
        raise ValueError("a t interval needs at least 2 values")
    mean, sd = _mean_sd(values)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the binomial(b + c, 1/2) test on the discordant pairs.

    Args:
        only_a: Samples model A gets right and model B wrong.
        only_b: Samples model B gets right and model A wrong.
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    # log-space sum of C(n, i) / 2^n for i <= k (exact enough for any n; math.comb would need huge integers)
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0) for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t test on ``a - b`` (1.0 when every difference is 0)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("a paired t test needs two sequences of the same length >= 2")
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = _mean_sd(diffs)
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return t_two_sided_p(mean / (sd / math.sqrt(len(diffs))), len(diffs) - 1)


# -- per-metric noise ------------------------------------------------------------------------------
@dataclasses.dataclass
class SampleScores:
    """Per-sample values behind one metric.

    Attributes:
        kind: ``"proportion"`` (0/1 values; metric = 100 * mean, percent), ``"mean"``
            (metric = mean) or ``"exp_mean"`` (metric = exp(mean), e.g. perplexity of NLLs).
        values: One value per sample (or token), in eval order.
        unit: What one value is: ``"samples"`` or ``"tokens"``.
        paired: Whether a paired test against FP32's values on the same samples makes sense
            (False for agreement with FP32 itself).
    """

    kind: str
    values: Sequence[float]
    unit: str = "samples"
    paired: bool = True


@dataclasses.dataclass
class MetricNoise:
    """n, a 95% interval and the paired test against FP32 of one metric (the ``results`` row fields).

    Attributes:
        n: Samples (or tokens) the metric averages over.
        ci_low / ci_high: The 95% interval, in the metric's units (percent for proportions).
        ci_method: How the interval was computed.
        p_value: Paired test against FP32 on the same samples (None for FP32 itself / no test).
        paired_test: Which test.
        within_noise: p >= 0.05: the difference to FP32 is not distinguishable from noise.
    """

    n: Optional[int] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    ci_method: Optional[str] = None
    p_value: Optional[float] = None
    paired_test: Optional[str] = None
    within_noise: Optional[bool] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _over(method: str, unit: str) -> str:
    return method if unit == "samples" else f"{method}, over {unit}"


def metric_noise(scores: SampleScores, reference: Optional[SampleScores] = None) -> MetricNoise:
    """The :class:`MetricNoise` of one metric, paired with FP32's ``reference`` scores where given.

    The paired test runs only when both have the same number of values (the same samples).
    """
    values = [float(v) for v in scores.values]
    n = len(values)
    out = MetricNoise(n=n)
    if n == 0:
        return out
    if scores.kind == "proportion":
        low, high = wilson_interval(int(round(sum(values))), n)
        out.ci_low, out.ci_high, out.ci_method = 100.0 * low, 100.0 * high, _over(WILSON, scores.unit)
    elif n >= 2:
        low, high = t_interval(values)
        if scores.kind == "exp_mean":
            low, high = math.exp(min(low, 700.0)), math.exp(min(high, 700.0))
            out.ci_method = _over(f"exp of {T_MEAN}", scores.unit)
        else:
            out.ci_method = _over(T_MEAN, scores.unit)
        out.ci_low, out.ci_high = low, high
    if reference is not None and scores.paired and len(reference.values) == n and n >= 2:
        ref = [float(v) for v in reference.values]
        if scores.kind == "proportion":
            only_ref = sum(1 for r, v in zip(ref, values) if r >= 0.5 > v)
            only_this = sum(1 for r, v in zip(ref, values) if v >= 0.5 > r)
            out.p_value, out.paired_test = mcnemar_exact(only_ref, only_this), _over(MCNEMAR, scores.unit)
        else:
            out.p_value, out.paired_test = paired_t_test(values, ref), _over(PAIRED_T, scores.unit)
        out.within_noise = out.p_value >= ALPHA
    return out


__all__ = [
    "ALPHA", "MCNEMAR", "PAIRED_T", "T_MEAN", "WILSON", "Z95", "MetricNoise", "SampleScores", "mcnemar_exact",
    "metric_noise", "paired_t_test", "regularized_beta", "t_interval", "t_quantile", "t_two_sided_p", "wilson_interval",
]
