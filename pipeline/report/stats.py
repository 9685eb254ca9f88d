"""Is a difference between two optimizers larger than seed-to-seed noise?

Per cell (dataset x architecture) each optimizer has one final test accuracy per seed. Two
optimizers are compared by Welch's t confidence interval for the difference of their means
(`welch`): it does not assume equal variances, which two optimizers need not have. The
Student t quantile it needs (`t_quantile`) comes from scipy.stats
(the pipeline extra).

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
    WORSE: "a lower mean whose interval against the cell's highest-mean optimizer excludes zero",
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
    # The same interval as scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(),
    # which however sees a constant side's rounding error (numpy's variance) as spread.
    se2 = va + vb
    df = se2**2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
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
            separated = all(
                welch(values, samples[p], level).excludes_zero for p in samples if p != o
            )
            out[o] = BEST if separated else TIED
        else:
            below = all(welch(values, samples[t], level).excludes_zero for t in tops)
            out[o] = WORSE if below else TIED
    return out


# ---------------------------------------------------------------------------------------------
# Student t distribution
#
# scipy.stats is imported in the functions that use it, not above: its import takes about a
# second, five times all of pipeline.aggregate's imports, which likewise leave matplotlib,
# pandas and mlflow to the functions that need them. Only an interval needs it; later calls
# find it loaded.


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for Student's t with `df` > 0 degrees of freedom (any real
    df: Welch's is not an integer)."""
    # Refused here, where scipy would answer nan (or +-inf at p = 0 or 1).
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), not {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, not {df}")
    import scipy.stats

    return float(scipy.stats.t.ppf(p, df))
