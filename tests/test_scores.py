"""Tests for experiments.scores: human-normalised scores and rliable aggregates."""

import warnings

import numpy as np
import pytest
from scipy import stats

from experiments import scores


def test_table_has_atari57_and_pong_values():
    table = scores.load_human_random_scores()
    assert len(table) == 57
    assert table["pong"] == (-20.7, 14.6)
    assert "space_invaders" in table and "montezuma_revenge" in table


def test_human_normalized_score_known_values():
    assert scores.human_normalized_score("pong", 14.6) == pytest.approx(1.0)
    assert scores.human_normalized_score("pong", -20.7) == pytest.approx(0.0)
    assert scores.human_normalized_score("Pong", -3.05) == pytest.approx(0.5)
    assert scores.human_normalized_score("ALE/Pong-v5", 14.6) == pytest.approx(1.0)
    random_score, human = scores.load_human_random_scores()["space_invaders"]
    assert scores.human_normalized_score("SpaceInvaders", human) == pytest.approx(1.0)
    np.testing.assert_allclose(
        scores.human_normalized_score("pong", np.array([-20.7, 14.6])), [0.0, 1.0])


def test_unknown_game_raises_value_error():
    with pytest.raises(ValueError, match="unknown Atari game 'CartPole-v1'"):
        scores.human_normalized_score("CartPole-v1", 100.0)
    assert not scores.has_human_random_scores("CartPole-v1")
    assert scores.has_human_random_scores("Breakout")


def _dopamine_name(game):
    """Dopamine's game-list spelling of a snake_case table name: 'up_n_down' -> 'UpNDown'."""
    return "".join(part.capitalize() for part in game.split("_"))


def test_every_table_game_round_trips_from_its_camel_case_name():
    table = scores.load_human_random_scores()
    names = {_dopamine_name(game): game for game in table}
    for camel in ("UpNDown", "MontezumaRevenge", "PrivateEye", "KungFuMaster", "YarsRevenge",
                  "Jamesbond", "MsPacman"):
        assert camel in names
    names.update({"JamesBond": "jamesbond", "ALE/UpNDown-v5": "up_n_down",
                  "UpNDownNoFrameskip-v4": "up_n_down", "up_n_down": "up_n_down"})
    for name, game in names.items():
        assert scores.canonical_game_name(name) == game, name
        assert scores.has_human_random_scores(name), name
        random_score, human = table[game]
        assert scores.human_normalized_score(name, human) == pytest.approx(1.0), name


def test_table_names_that_are_not_ale_roms_keep_their_conversion(monkeypatch):
    from experiments import environments

    def no_rom(name):
        raise ValueError(f"unknown Atari game {name!r}")

    monkeypatch.setattr(environments, "atari_game_name", no_rom)
    assert scores.canonical_game_name("UpNDown") == "up_n_down"
    assert scores.canonical_game_name("ALE/SpaceInvaders-v5") == "space_invaders"
    assert scores.canonical_game_name("CartPole-v1") == "cart_pole"
    assert scores.has_human_random_scores("MontezumaRevenge")


def _rliable_direct(matrix, reps, seed):
    from rliable import library as rly
    from rliable import metrics

    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        point, interval = rly.get_interval_estimates(
            {"x": matrix}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps,
            random_state=np.random.RandomState(seed))
    return point["x"][0], interval["x"][0, 0], interval["x"][1, 0]


def test_aggregate_iqm_matches_rliable_with_same_seed():
    matrix = np.random.default_rng(7).normal(1.0, 0.5, size=(5, 4))
    ours = scores.aggregate_iqm(matrix, reps=500, seed=3)
    direct = _rliable_direct(matrix, reps=500, seed=3)
    np.testing.assert_allclose(ours, direct, rtol=0, atol=0)
    other_seed = scores.aggregate_iqm(matrix, reps=500, seed=4)
    assert other_seed[0] == ours[0]  # the point estimate does not depend on the seed
    assert ours[1] <= ours[0] <= ours[2]


def test_aggregate_iqm_is_deterministic_and_restores_global_state():
    matrix = np.random.default_rng(1).normal(size=(3, 6))
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    a = scores.aggregate_iqm(matrix, reps=200, seed=0)
    assert np.random.rand() == expected_next  # caller's global state untouched
    b = scores.aggregate_iqm(matrix, reps=200, seed=0)
    assert a == b


def test_iqm_equals_trimmed_mean():
    matrix = np.random.default_rng(0).exponential(size=(6, 10))  # 60 values, divisible by 4
    point, _, _ = scores.aggregate_iqm(matrix, reps=50, seed=0)
    assert point == pytest.approx(stats.trim_mean(matrix.ravel(), 0.25))


def test_aggregate_iqm_curve_matches_per_step_iqm():
    s3 = np.random.default_rng(2).normal(size=(4, 3, 5))
    point, lo, hi = scores.aggregate_iqm_curve(s3, reps=300, seed=1)
    assert point.shape == lo.shape == hi.shape == (5,)
    for t in range(5):
        assert point[t] == pytest.approx(stats.trim_mean(s3[:, :, t].ravel(), 0.25))
    assert np.all(lo <= point + 1e-12) and np.all(point <= hi + 1e-12)
    # Same bootstrap as rliable on one step when there is a single step.
    single = s3[:, :, :1]
    p1, lo1, hi1 = scores.aggregate_iqm_curve(single, reps=300, seed=1)
    direct = _rliable_direct(single[:, :, 0], reps=300, seed=1)
    np.testing.assert_allclose([p1[0], lo1[0], hi1[0]], direct)


def test_mean_ci_t_interval():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, lo, hi = scores.mean_ci(values)
    half = stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2.0
    assert (mean, lo, hi) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert scores.mean_ci([5.0, np.nan]) == (5.0, 5.0, 5.0)
    assert all(np.isnan(scores.mean_ci([])))
    m, l, h = scores.per_task_mean_ci(np.array([[1.0, 10.0], [3.0, 10.0]]))
    np.testing.assert_allclose(m, [2.0, 10.0])
    assert l[0] < 2.0 < h[0] and l[1] == h[1] == 10.0


def test_bad_matrix_rejected():
    with pytest.raises(ValueError):
        scores.aggregate_iqm(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError):
        scores.aggregate_iqm(np.ones(4))
