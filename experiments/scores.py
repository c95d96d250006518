"""Human-normalised Atari scores and aggregate statistics (IQM, confidence intervals).

Data
----
``experiments/data/atari_human_random_scores.csv`` (package data, DQN Zoo's table for the
Atari-57 games) has the columns ``game,random,human`` with snake_case game names
(``pong``, ``space_invaders``, ``montezuma_revenge``). Dopamine's CamelCase names (``Pong``,
``SpaceInvaders``, ``UpNDown``, ``JamesBond``) and ALE ids (``ALE/Pong-v5``) are accepted and
converted by ``canonical_game_name`` with ``experiments.environments.atari_game_name``.

Statistics
----------
* Human-normalised score: ``HNS = (score - random) / (human - random)``.
* ``aggregate_iqm``: interquartile mean (25% trimmed mean) over all runs x games with a 95%
  stratified-bootstrap percentile confidence interval, computed by ``rliable``
  (Agarwal et al., NeurIPS 2021). The bootstrap draws from NumPy's *global* random state
  (rliable's ``StratifiedBootstrap.update_indices`` calls ``np.random.choice``), so these
  functions seed it with ``seed``, run rliable, and restore the caller's global state:
  results are deterministic given ``seed`` and identical to::

      np.random.seed(seed)
      rliable.library.get_interval_estimates(
          {"x": m}, lambda s: np.array([rliable.metrics.aggregate_iqm(s)]), reps=reps,
          random_state=np.random.RandomState(seed))

* ``mean_ci``: per-task mean over seeds with a two-sided Student-t interval
  (``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)``); with a single value the interval collapses
  to the point. NaNs are ignored.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.resources
import re
import warnings
from typing import Callable, Iterator

import numpy as np

_CSV_NAME = "atari_human_random_scores.csv"


@functools.lru_cache(maxsize=1)
def _scores_table() -> dict[str, tuple[float, float]]:
    text = (importlib.resources.files("experiments") / "data" / _CSV_NAME).read_text(
        encoding="utf-8")
    table: dict[str, tuple[float, float]] = {}
    for row in csv.DictReader(text.splitlines()):
        table[row["game"].strip()] = (float(row["random"]), float(row["human"]))
    return table


def load_human_random_scores() -> dict[str, tuple[float, float]]:
    """Return ``{game: (random_score, human_score)}`` for the Atari-57 games."""
    return dict(_scores_table())


def canonical_game_name(game: str) -> str:
    """Convert ``Pong`` / ``UpNDown`` / ``ALE/Pong-v5`` / ``PongNoFrameskip-v4`` to snake_case.

    Uses ``experiments.environments.atari_game_name`` (ale-py's ROM ids, CamelCase and compact
    spellings such as ``JamesBond``). A name that is not a ROM of the installed ale-py is
    converted to snake_case and matched against the score table ignoring underscores.
    """
    from experiments import environments  # imported lazily: loads ale-py

    name = re.sub(r"NoFrameskip(?=-v\d+$)", "", game.strip())
    try:
        return environments.atari_game_name(name)
    except ValueError:
        snake = environments.camel_to_snake(re.sub(r"^ALE/|-v\d+$", "", name))
        return _games_by_compact_name().get(snake.replace("_", ""), snake)


@functools.lru_cache(maxsize=1)
def _games_by_compact_name() -> dict[str, str]:
    return {game.replace("_", ""): game for game in _scores_table()}


def has_human_random_scores(game: str) -> bool:
    """True when ``game`` is in the human/random table (after name conversion)."""
    return canonical_game_name(game) in _scores_table()


def human_normalized_score(game: str, score):
    """``(score - random) / (human - random)`` for an Atari game; works on floats and arrays.

    Raises ValueError for a game that is not in the Atari-57 table.
    """
    table = _scores_table()
    key = canonical_game_name(game)
    if key not in table:
        raise ValueError(
            f"unknown Atari game {game!r} for human-normalised scores; use one of the "
            f"Atari-57 names such as 'pong' or 'space_invaders'")
    random_score, human_score = table[key]
    if isinstance(score, (list, tuple)):
        score = np.asarray(score, dtype=float)
    return (score - random_score) / (human_score - random_score)


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _interval_estimates(scores: np.ndarray, func: Callable[[np.ndarray], np.ndarray], *,
                        reps: int, seed: int, confidence: float):
    from rliable import library as rly  # imported lazily: optional 'plot' extra

    with _seeded_global_numpy(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arch: random_state deprecation
        point, interval = rly.get_interval_estimates(
            {"x": scores}, func, reps=reps, confidence_interval_size=confidence,
            random_state=np.random.RandomState(seed))
    return np.asarray(point["x"], dtype=float), np.asarray(interval["x"], dtype=float)


def _check_matrix(score_matrix, ndim: int) -> np.ndarray:
    m = np.asarray(score_matrix, dtype=float)
    if m.ndim != ndim or m.size == 0:
        raise ValueError(f"expected a non-empty {ndim}-D score array, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("score array contains NaN or inf; drop incomplete runs first")
    return m


def aggregate_iqm(score_matrix, reps: int = 2000, seed: int = 0,
                  confidence: float = 0.95) -> tuple[float, float, float]:
    """IQM over a ``[runs, games]`` score matrix and its stratified-bootstrap CI.

    Returns ``(point, ci_low, ci_high)``; see the module docstring for determinism.
    """
    from rliable import metrics

    m = _check_matrix(score_matrix, 2)
    point, interval = _interval_estimates(
        m, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps, seed=seed,
        confidence=confidence)
    return float(point[0]), float(interval[0, 0]), float(interval[1, 0])


def aggregate_iqm_curve(scores, reps: int = 2000, seed: int = 0,
                        confidence: float = 0.95):
    """IQM per time step of a ``[runs, games, steps]`` array, with stratified-bootstrap CIs.

    Returns three arrays of length ``steps``: ``(point, ci_low, ci_high)``. The IQM at each
    step is rliable's ``aggregate_iqm`` of the ``[runs, games]`` slice (vectorised).
    """
    from scipy import stats

    s3 = _check_matrix(scores, 3)
    steps = s3.shape[2]

    def iqm_per_step(s: np.ndarray) -> np.ndarray:
        return stats.trim_mean(s.reshape(-1, steps), proportiontocut=0.25, axis=0)

    point, interval = _interval_estimates(s3, iqm_per_step, reps=reps, seed=seed,
                                          confidence=confidence)
    return point, interval[0], interval[1]


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` (NaNs ignored) with a Student-t ``confidence`` interval.

    Returns ``(mean, low, high)``; one value gives ``(v, v, v)``; no values gives NaNs.
    """
    from scipy import stats

    v = np.asarray(values, dtype=float).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1)
                 / np.sqrt(v.size))
    return mean, mean - half, mean + half


def per_task_mean_ci(score_matrix, confidence: float = 0.95):
    """Per-game mean over runs of a ``[runs, games]`` matrix with Student-t CIs.

    Returns three arrays of length ``games``: ``(mean, ci_low, ci_high)``.
    """
    m = np.asarray(score_matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"expected a [runs, games] matrix, got shape {m.shape}")
    out = np.array([mean_ci(m[:, j], confidence) for j in range(m.shape[1])]).reshape(-1, 3)
    return out[:, 0], out[:, 1], out[:, 2]
