"""Welch's t intervals and the best / tied / worse standing (pipeline/report/stats.py), on planted
numbers whose answer is known: published t table values and intervals worked out by hand."""

import math

import pytest

from pipeline.report import stats
from pipeline.report.stats import BEST, NOT_ENOUGH, POINT, TIED, WORSE


# Student t critical values as printed in t tables (NIST/SEMATECH e-Handbook of Statistical
# Methods, section 1.3.6.7.2, prints them to 3 decimals; these are the same values to more).
@pytest.mark.parametrize(
    "p,df,table",
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.30265),
        (0.975, 4, 2.77645),
        (0.975, 10, 2.22814),
        (0.975, 30, 2.04227),
        (0.975, 1e7, 1.95996),
        (0.995, 1, 63.657),
        (0.95, 10, 1.812),
    ],
)
def test_t_quantiles_match_the_published_table(p, df, table):
    digits = len(f"{table}".split(".")[1])
    assert stats.t_quantile(p, df) == pytest.approx(table, abs=0.6 * 10**-digits)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-stats.t_quantile(p, df))


def test_non_integer_df_falls_between_its_integer_neighbours():
    # Fewer df: heavier tails.
    assert 2.57058 < stats.t_quantile(0.975, 4.5) < 2.77645


def test_t_quantile_matches_closed_forms():
    for p in (0.001, 0.1, 0.3, 0.5, 0.7, 0.9, 0.975, 0.999):
        alpha = 4 * p * (1 - p)
        q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
        closed = {
            1: math.tan(math.pi * (p - 0.5)),
            2: (2 * p - 1) / math.sqrt(2 * p * (1 - p)),
            4: math.copysign(2 * math.sqrt(q - 1), p - 0.5),
        }
        for df, t in closed.items():
            assert stats.t_quantile(p, df) == pytest.approx(t, rel=1e-9, abs=1e-12), (p, df)
    # Plain floats, not numpy scalars: welch's excludes_zero (low > 0 or high < 0) is a bool,
    # not a numpy.bool_, and summary.json and the CSVs get plain numbers.
    assert type(stats.t_quantile(0.975, 4.5)) is float


def test_t_quantile_refuses_impossible_arguments():
    for p, df in ((0, 3), (1, 3), (0.5, 0), (0.9, -1)):
        with pytest.raises(ValueError):
            stats.t_quantile(p, df)


def test_welch_interval_matches_the_hand_computation():
    # a = [1, 2, 3]: mean 2, sample variance 1; b = [4, 5, 6, 7]: mean 5.5, variance 5/3.
    # Difference: 2 - 5.5 = -3.5. se^2 = 1/3 + (5/3)/4 = 1/3 + 5/12 = 3/4.
    # df = (3/4)^2 / ((1/3)^2/2 + (5/12)^2/3) = (9/16) / (1/18 + 25/432) = (9/16)(432/49)
    #    = 243/49 = 4.95918.
    # t_0.975(243/49) = 2.57696 (scipy.stats.t.ppf, written down once here so that the
    # interval is checked against numbers, not against itself), between the table's 2.57058
    # (5) and 2.77645 (4).
    # Half-width: 2.57696 * sqrt(3/4) = 2.23171, so the interval is [-5.73171, -1.26829].
    d = stats.welch([1, 2, 3], [4, 5, 6, 7])
    assert d.mean_diff == pytest.approx(-3.5)
    assert d.df == pytest.approx(243 / 49)
    assert stats.t_quantile(0.975, d.df) == pytest.approx(2.57696, abs=5e-6)
    assert (d.low, d.high) == (pytest.approx(-5.73171, abs=5e-6), pytest.approx(-1.26829, abs=5e-6))
    assert (d.n_a, d.n_b, d.level, d.note) == (3, 4, 0.95, "")
    assert d.excludes_zero is True
    # Swapping the sides mirrors the interval.
    r = stats.welch([4, 5, 6, 7], [1, 2, 3])
    assert (r.low, r.high) == (pytest.approx(-d.high), pytest.approx(-d.low))


def test_an_interval_containing_zero_excludes_nothing():
    # a = [1, 2, 3], b = [2, 3, 4]: difference -1, both variances 1, se^2 = 2/3, df =
    # (2/3)^2 / (2 * (1/3)^2 / 2) = 4 exactly; half-width 2.77645 * sqrt(2/3) = 2.26696.
    d = stats.welch([1, 2, 3], [2, 3, 4])
    assert d.df == pytest.approx(4)
    assert (d.low, d.high) == (pytest.approx(-3.26696, abs=5e-6), pytest.approx(1.26696, abs=5e-6))
    assert d.excludes_zero is False


def test_a_constant_side_leaves_the_other_sides_degrees_of_freedom():
    # a = [1, 1, 1] has no spread: se^2 = var(b)/3 = 1/3 and df = n_b - 1 = 2; half-width
    # 4.30265 * sqrt(1/3) = 2.48414 around -2: [-4.48414, 0.48414], which contains zero.
    d = stats.welch([1, 1, 1], [2, 3, 4])
    assert d.df == pytest.approx(2)
    assert (d.low, d.high) == (pytest.approx(-4.48414, abs=5e-6), pytest.approx(0.48414, abs=5e-6))
    assert d.excludes_zero is False


def test_no_spread_on_either_side_gives_the_point_difference():
    # Nothing varies, so nothing is noise: the interval is the point difference, said so.
    d = stats.welch([0.7, 0.7, 0.7], [0.6, 0.6])
    assert d.low == d.high == d.mean_diff == pytest.approx(0.1)
    assert d.excludes_zero is True and d.df is None and d.note == POINT
    same = stats.welch([0.7, 0.7], [0.7, 0.7])
    assert same.mean_diff == 0 and same.excludes_zero is False and same.note == POINT


def test_one_seed_claims_no_interval():
    d = stats.welch([0.9], [0.1, 0.12, 0.11])
    assert d.note == NOT_ENOUGH and (d.low, d.high, d.df, d.excludes_zero) == (None,) * 4
    assert d.mean_diff == pytest.approx(0.79) and (d.n_a, d.n_b) == (1, 3)
    empty = stats.welch([], [0.1, 0.2])
    assert empty.mean_diff is None and empty.note == NOT_ENOUGH and empty.n_a == 0


def test_a_higher_level_widens_the_interval():
    narrow, wide = (
        stats.welch([1, 2, 3], [4, 5, 6, 7]),
        stats.welch([1, 2, 3], [4, 5, 6, 7], level=0.99),
    )
    assert wide.low < narrow.low and wide.high > narrow.high and wide.level == 0.99


# ---------------------------------------------------------------------------------------------
# standing: best, tied within noise, worse, not enough seeds


def test_a_clear_winner_is_best_and_the_rest_worse():
    # Three seeds each, 10 points apart, spread 1 point: every interval excludes zero.
    s = stats.standing(
        {"x": [0.80, 0.81, 0.82], "sgd": [0.70, 0.71, 0.72], "adam": [0.60, 0.61, 0.62]}
    )
    assert s == {"x": BEST, "sgd": WORSE, "adam": WORSE}


def test_a_tie_within_noise_is_no_win():
    # x's mean is highest, but against y (1 point lower, spread 2 points) the interval
    # contains zero: both tied; z is far below the top: worse.
    s = stats.standing({"x": [0.70, 0.72, 0.74], "y": [0.69, 0.71, 0.73], "z": [0.50, 0.51, 0.52]})
    assert s == {"x": TIED, "y": TIED, "z": WORSE}


def test_a_top_not_separated_from_everyone_is_not_best():
    # x is separated from z but not from y; y is not separated from x: x and y tied, z worse.
    s = stats.standing({"x": [0.70, 0.71, 0.72], "y": [0.66, 0.70, 0.74], "z": [0.60, 0.61, 0.62]})
    assert s == {"x": TIED, "y": TIED, "z": WORSE}


def test_equal_top_means_crown_neither():
    s = stats.standing({"x": [0.70, 0.70], "y": [0.70, 0.70], "z": [0.5, 0.5]})
    assert s == {"x": TIED, "y": TIED, "z": WORSE}


def test_one_seed_anywhere_in_a_cell_leaves_it_unranked():
    s = stats.standing({"x": [0.9], "y": [0.1, 0.2], "z": [0.3, 0.4]})
    assert s == {"x": NOT_ENOUGH, "y": NOT_ENOUGH, "z": NOT_ENOUGH}
    assert stats.standing({"x": [], "y": [0.1, 0.2]}) == {"x": NOT_ENOUGH, "y": NOT_ENOUGH}


def test_an_optimizer_alone_is_not_best():
    assert stats.standing({"x": [0.7, 0.8]}) == {"x": TIED}


def test_every_standing_word_has_its_definition():
    assert list(stats.STANDING) == [BEST, TIED, WORSE, NOT_ENOUGH]
    assert all(stats.STANDING.values())
