"""Is a difference between two optimizers larger than seed-to-seed noise?

Per cell (dataset x architecture) each optimizer has one final test accuracy per seed. Two
optimizers are compared by Welch's t confidence interval for the difference of their means
(`welch`): it does not assume equal variances, which two optimizers need not have. The
Student t quantile it needs is computed here (`t_quantile`), so that the project depends on
numpy alone, not scipy:

- the t CDF from the regularized incomplete beta function, F(t) = 1 - I_x(df/2, 1/2) / 2
  for t >= 0 with x = df / (df + t^2) (Abramowitz & Stegun 26.7.1; symmetric below 0);
- I_x(a, b) by its continued fraction, evaluated with the modified Lentz method (Numerical
  Recipes, "betacf"), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction
  converges slowly;
- the quantile by bisection on the CDF, which is monotonic: slow but certain, for any real
  df > 0 (Welch's df is not an integer).

`standing` then says, per cell, which optimizer is best, which are tied within noise and
which are worse, by the rules in `STANDING`.
"""

import math
import statistics
from dataclasses import dataclass

NOT_ENOUGH = "not enough seeds"
POINT = "no spread on either side: the interval is the point difference"

BEST, TIED, WORSE = "best", "tied within noise", "worse"
# The words the tables print and what they mean: the one definition, used by `standing` and
# quoted by the captions.
STANDING = {
    BEST: "the highest mean of the cell, and its interval against every other optimizer of "
          "the cell excludes zero",
    TIED: "the highest mean without that, or a lower mean whose interval against the cell's "
          "highest-mean optimizer includes zero",
    WORSE: "a lower mean whose interval against the cell's highest-mean optimizer excludes "
           "zero",
    NOT_ENOUGH: "some optimizer of the cell has fewer than 2 finished seeds, so no interval "
                "(the whole cell is not ranked)",
}


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) and its two-sided Welch interval at `level`.

    `low`, `high`, `df` and `excludes_zero` are None when a side has fewer than 2 values
    (`note` is then NOT_ENOUGH): one seed has no spread to tell noise from a difference.
    `mean_diff` is None only when a side has no value at all. When both sides have zero
    variance the interval is the point difference (`low == high == mean_diff`, `df` None,
    `note` POINT): nothing varies, so nothing is noise."""
    mean_diff: float | None
    low: float | None
    high: float | None
    df: float | None
    n_a: int
    n_b: int
    excludes_zero: bool | None
    level: float = 0.95
    note: str = ""


def welch(a: list[float], b: list[float], level: float = 0.95) -> Difference:
    """Welch's t interval for mean(a) - mean(b): the difference +- t_q(df) * se, with
    se^2 = var(a)/n_a + var(b)/n_b (sample variances) and the Welch-Satterthwaite
    df = se^4 / ((var(a)/n_a)^2/(n_a-1) + (var(b)/n_b)^2/(n_b-1)), q = (1 + level) / 2."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    n_a, n_b = len(a), len(b)
    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else None
    if n_a < 2 or n_b < 2:
        return Difference(diff, None, None, None, n_a, n_b, None, level, NOT_ENOUGH)
    # statistics.variance is exact for constant samples (0, not 1e-33), which the POINT case
    # relies on.
    va, vb = statistics.variance(a) / n_a, statistics.variance(b) / n_b
    if va == 0 and vb == 0:
        return Difference(diff, diff, diff, None, n_a, n_b, diff != 0, level, POINT)
    se2 = va + vb
    df = se2 ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))
    half = t_quantile((1 + level) / 2, df) * math.sqrt(se2)
    low, high = diff - half, diff + half
    return Difference(diff, low, high, df, n_a, n_b, low > 0 or high < 0, level)


def standing(samples: dict[str, list[float]], level: float = 0.95) -> dict[str, str]:
    """Each optimizer's standing in one cell (`samples`: optimizer -> its values over seeds),
    one of the keys of `STANDING`, by the definitions there. Intervals: `welch` at `level`.
    With several optimizers at the very same highest mean, a lower one is worse only when its
    interval against each of them excludes zero. An optimizer alone in its cell has beaten
    no one: tied, not best."""
    if any(len(v) < 2 for v in samples.values()):
        return {o: NOT_ENOUGH for o in samples}
    if len(samples) < 2:
        return {o: TIED for o in samples}
    means = {o: statistics.fmean(v) for o, v in samples.items()}
    top = max(means.values())
    tops = [o for o, m in means.items() if m == top]
    out = {}
    for o, values in samples.items():
        if o in tops:
            separated = all(welch(values, samples[p], level).excludes_zero
                            for p in samples if p != o)
            out[o] = BEST if separated else TIED
        else:
            below = all(welch(values, samples[t], level).excludes_zero for t in tops)
            out[o] = WORSE if below else TIED
    return out


# ---------------------------------------------------------------------------------------------
# Student t distribution


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on `t_cdf` (to 1e-12 relative or absolute)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), not {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, not {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:  # bracket: heavy tails (df = 1) need a wide one
        low, high = high, 2 * high
    while high - low > 1e-12 * max(1.0, high):
        mid = (low + high) / 2
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast for x below (a+1)/(a+b+2); above, the symmetric
    # form does.
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float, tol: float = 1e-15,
                   max_terms: int = 100_000) -> float:
    """The continued fraction of I_x(a, b) by the modified Lentz method."""
    tiny = 1e-300  # stands in for a zero denominator, as Lentz's method prescribes
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < tol:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")
