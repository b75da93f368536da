import math

import numpy as np
import pytest

from diffkern.demos.seeds import fmt, t_interval, t_interval_dict


def test_t_interval_matches_the_textbook_formula():
    # n = 4, mean 2.5, s = sqrt(5/3); t_{3, 0.975} = 3.182446305284263
    iv = t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert iv.mean == 2.5
    assert iv.lo == pytest.approx(2.5 - half, rel=1e-12) and iv.hi == pytest.approx(2.5 + half, rel=1e-12)


def test_t_interval_covers_at_its_level():
    rng = np.random.default_rng(0)
    draws = rng.normal(1.0, 2.0, size=(4000, 3))
    hits = sum(t_interval(row).lo <= 1.0 <= t_interval(row).hi for row in draws)
    # 95% nominal; binomial sd of the rate over 4000 trials is 0.0034
    assert abs(hits / 4000 - 0.95) < 0.015


def test_t_interval_nan_and_bad_input():
    assert math.isnan(t_interval([1.0, float("nan")]).mean)
    with pytest.raises(ValueError, match="values"):
        t_interval([1.0])
    with pytest.raises(ValueError, match="level"):
        t_interval([1.0, 2.0], level=1.5)
    assert fmt(t_interval([1.0, 2.0, 3.0])) == "2 [-0.484, 4.48]"


def test_stored_form_formats_like_the_interval():
    d = t_interval_dict([1.0, 2.0, 3.0])
    assert set(d) == {"mean", "lo", "hi", "level", "values"} and d["values"] == [1.0, 2.0, 3.0]
    assert fmt({**d, "task": "sudoku"}) == fmt(t_interval([1.0, 2.0, 3.0])) == "2 [-0.484, 4.48]"
