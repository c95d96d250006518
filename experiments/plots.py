"""Plots and a summary table from the ``metrics.jsonl`` files of many runs (``moerl plot``).

Input
-----
Every ``metrics.jsonl`` under ``runs_dir`` (searched recursively) is one run. Each line is one
iteration (keys: ``iteration``, ``agent_steps``, ``frames``, ``train_episode_return_mean``,
``eval_episode_return_mean`` ... and the identity keys ``game``, ``is_atari``, ``seed``,
``agent``, ``penultimate``, ``num_experts``, ``scale``, ``num_params``, ``variant``). Lines
that do not parse (a torn last line) are skipped; a repeated iteration keeps its last line.
A run's identity is taken from its last line; a null ``variant`` becomes
``f"{agent}-{penultimate}"``. Runs are grouped by (variant, scale, game, seed); two files
with the same identity keep the longer one (with a note).

A *series* is one curve: a variant at one scale. Its label is the variant name, or
``"<variant> (scale S)"`` when the variant's runs have several scales. Each label has one
fixed colour in every figure: ``color_map`` gives sorted labels the tab10 colours in order.

Score
-----
The plotted return is ``train_episode_return_mean``, or ``eval_episode_return_mean`` when no
run has a training return. Final scores are compared at a common training horizon: the
*horizon* of a game is the last iteration that every run of that game (all series, scales and
seeds) logged, and iterations of longer runs after it are ignored (a note names the game, the
horizon and the shortest run). The final score of a run is the mean of the last ``last_n``
non-null values of that return up to its game's horizon (default ``last_n``: 10% of the run's
logged iterations up to the horizon, at least 1). Atari games in the Atari-57 table are
human-normalised (``experiments.scores``); other games keep raw returns.

Like with like (scaling Atari panel and summary aggregate rows): every point of the panel, and
every aggregate row, is computed over the same games: those that all points (all Atari series)
have. Games missing from some of them are left out everywhere, with a note naming them; when
they share no game, the panel (the aggregate rows) is skipped with a note.

Output (``out_dir``, default ``runs_dir/plots``), each figure as PNG and PDF
-----------------------------------------------------------------------------
* ``learning_curves``: one panel per game; return against frames (millions) for Atari or
  agent steps otherwise; mean over seeds with a 95% Student-t band; one line per series.
* ``aggregate_iqm`` (only with Atari runs): IQM of human-normalised scores over games x
  seeds at each iteration (iterations every run of the series has), 95% stratified-bootstrap
  CIs from rliable; x = frames (millions). A series keeps the same number of seeds in every
  game (the smallest count; noted when that drops runs); a series with fewer games than the
  figure is labelled ``"<series> [n games]"``.
* ``scaling``: final score against ``scale`` (log2 axis; experts for MoE, width multiplier
  for dense) and against ``num_params`` (log axis; median over the runs of a point). Row 1:
  IQM of HNS over the panel's common Atari games x seeds with bootstrap CIs (a point keeps
  the same number of seeds in every game); one more row per non-Atari game
  with the mean raw return and t-CIs. One line per penultimate type, labelled
  ``agent-penultimate`` (the default variant name), split by variant where two variants of
  that type share a scale.
* ``summary.csv`` with the columns ``SUMMARY_COLUMNS``. ``level=run``: one row per run
  (``final_score``, ``hns``, ``last_n``, ``final_iteration``: the game's horizon).
  ``level=game``: per series and game, mean over seeds of ``final_score`` and ``hns`` with a
  t-interval of ``final_score`` (raw returns, not HNS) in ``ci_low``/``ci_high``, blank for one
  seed. ``level=aggregate`` (Atari only): per series, ``game="atari"``, ``iqm`` of HNS over the
  common games (``num_games``) x seeds (``num_runs`` values) with bootstrap
  ``ci_low``/``ci_high`` (HNS). Floats are written with full precision.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from experiments import scores as scores_lib
from experiments.logger import read_metrics
from experiments.run_dir import (RunDirError, atomic_write_bytes, check_output_files,
                                 figure_bytes)
from networks.checks import is_int


class PlotError(ValueError):
    """Bad plot input; the message is one sentence naming the problem and the fix."""


SUMMARY_COLUMNS = ["level", "variant", "series", "agent", "penultimate", "game", "seed",
                   "scale", "num_experts", "num_params", "num_iterations", "final_iteration",
                   "last_n", "final_score", "hns", "iqm", "ci_low", "ci_high", "num_runs",
                   "num_games"]

SCALE_LABEL = "number of experts (dense: width multiplier)"


@dataclasses.dataclass
class Run:
    """One run's identity and per-iteration arrays (NaN where a value was null)."""

    path: str
    variant: str
    game: str
    seed: Any
    agent: str | None
    penultimate: str | None
    num_experts: Any
    scale: Any
    num_params: Any
    is_atari: bool
    iterations: np.ndarray
    agent_steps: np.ndarray
    frames: np.ndarray
    train_return: np.ndarray
    eval_return: np.ndarray
    series: str = ""

    @property
    def key(self) -> tuple:
        return (self.variant, _hashable(self.scale), self.game, _hashable(self.seed))

    @property
    def has_hns(self) -> bool:
        return self.is_atari and scores_lib.has_human_random_scores(self.game)


@dataclasses.dataclass
class PlotResult:
    """What ``plot_runs`` wrote: figure files, the summary CSV and notes on skipped parts."""

    out_dir: str
    files: list[str]
    summary_csv: str
    num_runs: int
    metric: str
    notes: list[str]
    colors: dict[str, tuple]


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _num(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):  # an integer past float's range
        return math.nan


# --------------------------------------------------------------------------- loading


def _read_metrics(path: Path) -> list[dict]:
    """The last record logged for each iteration, in iteration order.

    Lines ``read_metrics`` cannot parse (torn or damaged) and records without an int
    ``iteration`` are skipped; a resumed run may repeat an iteration.
    """
    by_iter: dict[int, dict] = {}
    for row in read_metrics(path, lenient=True):
        it = row.get("iteration")
        if is_int(it):
            by_iter[it] = row
    return [by_iter[k] for k in sorted(by_iter)]


def load_runs(runs_dir: str | os.PathLike, notes: list[str] | None = None) -> list[Run]:
    """Load every ``metrics.jsonl`` under ``runs_dir``; raise PlotError when none is usable."""
    notes = [] if notes is None else notes
    root = Path(runs_dir).expanduser()
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise PlotError(f"runs directory {root} {what}; pass the sweep out_dir or a "
                        f"run's --base_dir")
    paths = sorted(root.rglob("metrics.jsonl"))
    if not paths:
        raise PlotError(f"no metrics.jsonl found under {root}; pass the directory that holds "
                        f"your runs (a sweep out_dir or a --base_dir)")
    by_key: dict[tuple, Run] = {}
    for path in paths:
        try:
            rows = _read_metrics(path)
        except OSError as e:
            notes.append(f"skipped {path}: cannot read it ({e.strerror})")
            continue
        if not rows:
            notes.append(f"skipped {path}: no complete iteration logged")
            continue
        last = rows[-1]
        agent, pen = last.get("agent"), last.get("penultimate")
        variant = last.get("variant")
        if not variant:
            variant = f"{agent}-{pen}" if agent and pen else str(path.parent.relative_to(root))
        game = str(last.get("game") or "unknown")
        run = Run(
            path=str(path), variant=str(variant), game=game, seed=last.get("seed"),
            agent=agent, penultimate=pen, num_experts=last.get("num_experts"),
            scale=last.get("scale"), num_params=last.get("num_params"),
            is_atari=bool(last.get("is_atari", False)),
            iterations=np.array([int(r["iteration"]) for r in rows]),
            agent_steps=np.array([_num(r.get("agent_steps")) for r in rows]),
            frames=np.array([_num(r.get("frames")) for r in rows]),
            train_return=np.array([_num(r.get("train_episode_return_mean")) for r in rows]),
            eval_return=np.array([_num(r.get("eval_episode_return_mean")) for r in rows]))
        if run.key in by_key:
            other = by_key[run.key]
            keep, drop = (run, other) if len(run.iterations) > len(other.iterations) else (
                other, run)
            notes.append(f"{drop.path} duplicates {keep.path} (same variant, scale, game and "
                         f"seed); kept the longer run")
            by_key[run.key] = keep
        else:
            by_key[run.key] = run
    runs = list(by_key.values())
    if not runs:
        raise PlotError(f"no usable runs under {root}: every metrics.jsonl is empty or "
                        f"unreadable; check that the runs logged at least one iteration")
    _assign_series(runs)
    runs.sort(key=lambda r: (r.series, r.game, str(r.seed)))
    return runs


def _fmt_scale(s: Any) -> str:
    if isinstance(s, float) and s.is_integer():
        return str(int(s))
    return str(s)


def _assign_series(runs: list[Run]) -> None:
    scales = defaultdict(set)
    for r in runs:
        scales[r.variant].add(_hashable(r.scale))
    for r in runs:
        r.series = (r.variant if len(scales[r.variant]) == 1
                    else f"{r.variant} (scale {_fmt_scale(r.scale)})")


def color_map(labels: Iterable[str]) -> dict[str, tuple]:
    """Fixed colours: sorted unique labels get tab10 colours in order (tab20 beyond 10)."""
    from matplotlib import colormaps

    labels = sorted(set(labels))
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: tuple(cmap(i % cmap.N)) for i, label in enumerate(labels)}


# --------------------------------------------------------------------------- scores


def choose_metric(runs: Sequence[Run]) -> str:
    """'train' unless no run has any training return and some run has eval returns."""
    if any(np.isfinite(r.train_return).any() for r in runs):
        return "train"
    if any(np.isfinite(r.eval_return).any() for r in runs):
        return "eval"
    return "train"


def _values(run: Run, metric: str) -> np.ndarray:
    return run.train_return if metric == "train" else run.eval_return


def _reached(run: Run, horizon: int | None) -> np.ndarray:
    """Mask of the run's iterations up to ``horizon`` (all of them when None)."""
    return np.ones(len(run.iterations), bool) if horizon is None else run.iterations <= horizon


def default_last_n(run: Run, horizon: int | None = None) -> int:
    """10% of the run's logged iterations up to ``horizon`` (default: all), at least 1."""
    return max(1, int(_reached(run, horizon).sum()) // 10)


def _window(run: Run, last_n: int | None, horizon: int | None) -> int:
    return default_last_n(run, horizon) if last_n is None else last_n


def final_score(run: Run, metric: str = "train", last_n: int | None = None,
                horizon: int | None = None) -> float:
    """Mean of the last ``last_n`` non-null returns up to iteration ``horizon`` (NaN if none)."""
    vals = _values(run, metric)[_reached(run, horizon)]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return math.nan
    return float(np.mean(vals[-_window(run, last_n, horizon):]))


def final_horizons(runs: Sequence[Run], notes: list[str]) -> dict[str, int]:
    """Game -> the last iteration every run of that game logged (the common horizon)."""
    horizons = {}
    for game in sorted({r.game for r in runs}):
        rs = [r for r in runs if r.game == game]
        shortest = min(rs, key=lambda r: int(r.iterations[-1]))
        horizons[game] = int(shortest.iterations[-1])
        longer = sum(int(r.iterations[-1]) > horizons[game] for r in rs)
        if longer:
            notes.append(f"final scores of {game}: taken up to iteration {horizons[game]}, the "
                         f"last one all {len(rs)} runs of the game logged ({longer} longer "
                         f"run(s) cut there; shortest: {shortest.path})")
    return horizons


@dataclasses.dataclass(frozen=True)
class FinalScore:
    """A run's final score over ``last_n`` iterations ending at ``horizon``, and its HNS."""

    score: float
    hns: float
    last_n: int
    horizon: int


def final_scores(runs: Sequence[Run], metric: str, last_n: int | None,
                 notes: list[str]) -> dict[tuple, FinalScore]:
    """Run key -> FinalScore, every run of a game cut at the game's common horizon."""
    horizons = final_horizons(runs, notes)
    out = {}
    for r in runs:
        h = horizons[r.game]
        fs = final_score(r, metric, last_n, h)
        out[r.key] = FinalScore(fs, _hns(r, fs), _window(r, last_n, h), h)
    return out


def _hns(run: Run, score: float) -> float:
    if not run.has_hns or not np.isfinite(score):
        return math.nan
    return float(scores_lib.human_normalized_score(run.game, score))


def _balanced_matrix(runs: list[Run], value_of, notes: list[str], what: str):
    """[seeds, games] selection of runs with the same number of seeds per game."""
    by_game = defaultdict(list)
    for r in runs:
        by_game[r.game].append(r)
    games = sorted(by_game)
    k = min(len(v) for v in by_game.values())
    if any(len(v) > k for v in by_game.values()):
        notes.append(f"{what}: used {k} seed(s) per game (the smallest count) so the "
                     f"stratified bootstrap has a full runs x games matrix")
    chosen = [sorted(by_game[g], key=lambda r: str(r.seed))[:k] for g in games]
    matrix = np.array([[value_of(chosen[j][i]) for j in range(len(games))] for i in range(k)])
    return games, chosen, matrix


def _common_games(groups: dict[Any, list[Run]], notes: list[str], what: str):
    """Restrict every group of runs to the games all groups have; None when they share none."""
    game_sets = [{r.game for r in rs} for rs in groups.values()]
    if not game_sets:
        return {}
    common = set.intersection(*game_sets)
    left_out = sorted(set.union(*game_sets) - common)
    if not common:
        notes.append(f"{what}: skipped, its {len(groups)} compared groups share no game "
                     f"(games: {', '.join(left_out)})")
        return None
    if left_out:
        notes.append(f"{what}: compared over the {len(common)} game(s) all its groups have "
                     f"({', '.join(sorted(common))}); left out {', '.join(left_out)}")
    return {key: [r for r in rs if r.game in common] for key, rs in groups.items()}


# --------------------------------------------------------------------------- figures


def _new_figure(nrows: int, ncols: int, w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols + 2.2, h * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _legend(fig, axes_list) -> None:
    handles = {}
    for ax in axes_list:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in handles:
                handles[l] = h
    if handles:
        order = sorted(handles)
        fig.legend([handles[l] for l in order], order, loc="outside right center",
                   fontsize="small", frameon=False)


def _x_for(run_list: list[Run], iters: np.ndarray, atari: bool):
    table = defaultdict(list)
    for r in run_list:
        src = r.frames if atari else r.agent_steps
        for it, v in zip(r.iterations, src):
            table[int(it)].append(v)
    x = np.array([np.nanmean(table[int(i)]) if np.isfinite(table[int(i)]).any() else np.nan
                  for i in iters])
    if not np.isfinite(x).all():  # no step counts logged: fall back to iteration index
        return iters.astype(float), "iteration"
    return (x / 1e6, "frames (millions)") if atari else (x, "agent steps")


def learning_curves_figure(runs: Sequence[Run], colors: dict[str, tuple], metric: str):
    """One panel per game: mean return over seeds with a 95% t band, one line per series."""
    games = sorted({r.game for r in runs}, key=lambda g: (not _game_is_atari(runs, g), g))
    ncols = min(3, len(games))
    nrows = math.ceil(len(games) / ncols)
    fig, axes = _new_figure(nrows, ncols, 4.2, 3.1)
    what = "training" if metric == "train" else "evaluation"
    for idx, game in enumerate(games):
        ax = axes[idx // ncols][idx % ncols]
        game_runs = [r for r in runs if r.game == game]
        atari = _game_is_atari(runs, game)
        xlabel = "frames (millions)" if atari else "agent steps"
        for series in sorted({r.series for r in game_runs}):
            sr = [r for r in game_runs if r.series == series]
            iters = np.array(sorted({int(i) for r in sr for i in r.iterations}))
            mat = np.full((len(sr), len(iters)), np.nan)
            pos = {int(i): j for j, i in enumerate(iters)}
            for i, r in enumerate(sr):
                for it, v in zip(r.iterations, _values(r, metric)):
                    mat[i, pos[int(it)]] = v
            keep = np.isfinite(mat).any(axis=0)
            if not keep.any():
                continue
            x, xlabel = _x_for(sr, iters, atari)
            stats = np.array([scores_lib.mean_ci(mat[:, j]) for j in np.flatnonzero(keep)])
            color = colors[series]
            ax.plot(x[keep], stats[:, 0], color=color, lw=1.6,
                    label=series, marker="o" if keep.sum() == 1 else None)
            ax.fill_between(x[keep], stats[:, 1], stats[:, 2], color=color, alpha=0.2, lw=0)
        n_seeds = max((len({str(r.seed) for r in game_runs if r.series == s})
                       for s in {r.series for r in game_runs}), default=0)
        ax.set_title(f"{game} ({n_seeds} seed{'s' if n_seeds != 1 else ''})", fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{what} episode return")
        ax.grid(alpha=0.3)
    for idx in range(len(games), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    fig.suptitle(f"Learning curves: mean {what} return over seeds (95% t-interval)")
    _legend(fig, [a for row in axes for a in row])
    return fig


def _game_is_atari(runs: Sequence[Run], game: str) -> bool:
    return any(r.is_atari for r in runs if r.game == game)


def aggregate_iqm_figure(runs: Sequence[Run], colors: dict[str, tuple], metric: str, *,
                         reps: int, seed: int, notes: list[str]):
    """IQM of HNS per iteration over Atari games x seeds; None when no Atari run has HNS."""
    atari = [r for r in runs if r.has_hns]
    if not atari:
        return None
    fig, axes = _new_figure(1, 1, 6.0, 3.8)
    ax = axes[0][0]
    all_games = sorted({r.game for r in atari})
    drawn = False
    for series in sorted({r.series for r in atari}):
        sr = [r for r in atari if r.series == series]
        games, chosen, _ = _balanced_matrix(sr, lambda r: 0.0, notes, f"aggregate_iqm {series}")
        flat = [r for col in chosen for r in col]
        common = None
        for r in flat:
            ok = {int(i) for i, v in zip(r.iterations, _values(r, metric)) if np.isfinite(v)}
            common = ok if common is None else common & ok
        iters = np.array(sorted(common or ()))
        if iters.size == 0:
            notes.append(f"aggregate_iqm: skipped {series}: its runs share no iteration with "
                         f"a return")
            continue
        k = len(chosen[0])
        s3 = np.empty((k, len(games), len(iters)))
        for j, col in enumerate(chosen):
            for i, r in enumerate(col):
                lookup = dict(zip(r.iterations.tolist(), _values(r, metric)))
                s3[i, j] = scores_lib.human_normalized_score(
                    r.game, np.array([lookup[int(t)] for t in iters]))
        point, lo, hi = scores_lib.aggregate_iqm_curve(s3, reps=reps, seed=seed)
        x, xlabel = _x_for(flat, iters, True)
        label = series if len(games) == len(all_games) else f"{series} [{len(games)} games]"
        ax.plot(x, point, color=colors[series], lw=1.6, label=label,
                marker="o" if len(x) == 1 else None)
        ax.fill_between(x, lo, hi, color=colors[series], alpha=0.2, lw=0)
        ax.set_xlabel(xlabel)
        drawn = True
    if not drawn:
        return None
    ax.set_ylabel("IQM human-normalised score")
    ax.grid(alpha=0.3)
    what = "training" if metric == "train" else "evaluation"
    ax.set_title(f"IQM of human-normalised {what} return over {len(all_games)} Atari "
                 f"game(s) x seeds\n(95% stratified-bootstrap CI, {reps} reps)",
                 fontsize="medium")
    _legend(fig, [ax])
    return fig


def _scaling_lines(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Line label -> runs: one line per penultimate type unless variants collide."""
    by_type = defaultdict(list)
    for r in runs:
        by_type[f"{r.agent}-{r.penultimate}" if r.agent and r.penultimate
                else r.variant].append(r)
    lines: dict[str, list[Run]] = {}
    for label, rs in by_type.items():
        per_scale = defaultdict(set)
        for r in rs:
            per_scale[_hashable(r.scale)].add(r.variant)
        variants = {r.variant for r in rs}
        if any(len(v) > 1 for v in per_scale.values()) or len(variants) == 1:
            # One variant per line: label it as the learning curves do, so a
            # variant keeps its colour in every figure.
            for r in rs:
                lines.setdefault(r.variant, []).append(r)
        else:
            lines.setdefault(label, []).extend(rs)
    return lines


def scaling_points(runs: Sequence[Run], final: dict[tuple, FinalScore], *, reps: int,
                   seed: int, notes: list[str]):
    """Rows of points: {panel: [(line, scale, num_params, y, lo, hi, n), ...]}.

    ``final``: every run's FinalScore (``final_scores``)."""
    panels: dict[str, list[tuple]] = {}
    usable = []
    for r in runs:
        if not (isinstance(r.scale, (int, float)) and not isinstance(r.scale, bool)
                and r.scale > 0):
            notes.append(f"scaling: skipped {r.path}: no positive numeric 'scale'")
            continue
        usable.append(r)
    lines = _scaling_lines(usable)
    points = {(line, scale): [r for r in rs if r.has_hns and r.scale == scale]
              for line, rs in sorted(lines.items())
              for scale in sorted({r.scale for r in rs if r.has_hns})}
    points = _common_games(points, notes, "scaling (Atari panel)")
    if points:
        pts = []
        for (line, scale), at in points.items():
            _, chosen, m = _balanced_matrix(at, lambda r: final[r.key].hns, notes,
                                            f"scaling {line} scale {_fmt_scale(scale)}")
            if not np.isfinite(m).all():
                notes.append(f"scaling: skipped {line} at scale {_fmt_scale(scale)}: a run "
                             f"has no return")
                continue
            y, lo, hi = scores_lib.aggregate_iqm(m, reps=reps, seed=seed)
            params = _median([r.num_params for col in chosen for r in col])
            pts.append((line, scale, params, y, lo, hi, m.size))
        panels["Atari: IQM human-normalised score"] = pts
    for game in sorted({r.game for r in usable if not r.has_hns}):
        pts = []
        for line, rs in sorted(lines.items()):
            rs = [r for r in rs if r.game == game]
            for scale in sorted({r.scale for r in rs}):
                at = [r for r in rs if r.scale == scale]
                vals = [final[r.key].score for r in at]
                y, lo, hi = scores_lib.mean_ci(vals)
                if not np.isfinite(y):
                    continue
                pts.append((line, scale, _median([r.num_params for r in at]), y, lo, hi,
                            int(np.isfinite(vals).sum())))
        panels[f"{game}: mean return (raw)"] = pts
    return panels


def _median(values: Iterable[Any]) -> float:
    v = np.array([_num(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def scaling_figure(panels: dict[str, list[tuple]], colors: dict[str, tuple], metric: str):
    """Final score against scale (log2) and num_params (log); one row per panel."""
    rows = [p for p in panels if panels[p]]
    if not rows:
        return None
    fig, axes = _new_figure(len(rows), 2, 4.6, 3.3)
    what = "training" if metric == "train" else "evaluation"
    for i, panel in enumerate(rows):
        pts = panels[panel]
        for col, (xi, xlabel, base) in enumerate([(1, SCALE_LABEL, 2),
                                                  (2, "number of parameters", 10)]):
            ax = axes[i][col]
            for line in sorted({p[0] for p in pts}):
                lp = sorted((p for p in pts if p[0] == line and np.isfinite(p[xi])),
                            key=lambda p: p[xi])
                if not lp:
                    continue
                x = np.array([p[xi] for p in lp], dtype=float)
                y = np.array([p[3] for p in lp])
                yerr = np.array([[p[3] - p[4] for p in lp], [p[5] - p[3] for p in lp]])
                ax.errorbar(x, y, yerr=np.clip(yerr, 0, None), color=colors[line], marker="o",
                            ms=4, lw=1.5, capsize=3, label=line)
            ax.set_xscale("log", base=base)
            if col == 0:  # ticks at the swept scales, written as plain numbers
                from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

                ticks = sorted({float(p[1]) for p in pts})
                ax.xaxis.set_major_locator(FixedLocator(ticks))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(panel.split(": ", 1)[1] if col == 0 else "")
            ax.set_title(panel.split(": ", 1)[0] + (" vs scale" if col == 0
                                                    else " vs parameters"),
                         fontsize="medium")
            ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Scaling: final {what} score (95% CI; Atari: stratified bootstrap, "
                 f"others: t-interval over seeds)")
    _legend(fig, [a for row in axes for a in row])
    return fig


# --------------------------------------------------------------------------- summary


def summary_rows(runs: Sequence[Run], final: dict[tuple, FinalScore], *, reps: int,
                 seed: int, notes: list[str]) -> list[dict]:
    """Rows for summary.csv (see the module docstring); ``final`` as for scaling_points."""
    rows: list[dict] = []
    for r in runs:
        f = final[r.key]
        rows.append(dict(level="run", variant=r.variant, series=r.series, agent=r.agent,
                         penultimate=r.penultimate, game=r.game, seed=r.seed, scale=r.scale,
                         num_experts=r.num_experts, num_params=r.num_params,
                         num_iterations=len(r.iterations), final_iteration=f.horizon,
                         last_n=f.last_n, final_score=f.score, hns=f.hns, num_runs=1))
    groups = defaultdict(list)
    for r in runs:
        groups[(r.series, r.game)].append(r)
    for (series, game), rs in sorted(groups.items()):
        fs = [final[r.key].score for r in rs]
        mean, lo, hi = scores_lib.mean_ci(fs)
        if np.isfinite(fs).sum() < 2:  # one seed has no interval: left blank
            lo = hi = math.nan
        hns = [final[r.key].hns for r in rs]
        r0 = rs[0]
        rows.append(dict(level="game", variant=r0.variant, series=series, agent=r0.agent,
                         penultimate=r0.penultimate, game=game, scale=r0.scale,
                         num_experts=r0.num_experts, num_params=_median(r.num_params for r in rs),
                         final_iteration=final[r0.key].horizon, final_score=mean,
                         hns=float(np.nanmean(hns)) if np.isfinite(hns).any() else math.nan,
                         ci_low=lo, ci_high=hi, num_runs=int(np.isfinite(fs).sum())))
    atari = {series: [r for r in runs if r.series == series and r.has_hns]
             for series in sorted({r.series for r in runs if r.has_hns})}
    for series, rs in (_common_games(atari, notes, "summary aggregate rows") or {}).items():
        games, chosen, m = _balanced_matrix(rs, lambda r: final[r.key].hns, notes,
                                            f"summary {series}")
        if not np.isfinite(m).all():
            notes.append(f"summary: no aggregate for {series}: a run has no return")
            continue
        iqm, lo, hi = scores_lib.aggregate_iqm(m, reps=reps, seed=seed)
        r0 = rs[0]
        rows.append(dict(level="aggregate", variant=r0.variant, series=series, agent=r0.agent,
                         penultimate=r0.penultimate, game="atari", scale=r0.scale,
                         num_experts=r0.num_experts,
                         num_params=_median(r.num_params for col in chosen for r in col),
                         iqm=iqm, ci_low=lo, ci_high=hi, num_runs=int(m.size),
                         num_games=len(games)))
    return rows


def _cell(v: Any, column: str = "") -> str:
    if v is None:
        return ""
    if column == "num_params" and isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    if isinstance(v, (np.floating, np.integer)):
        return _cell(v.item())
    return str(v)


def summary_csv(rows: list[dict]) -> str:
    """The text of summary.csv."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(SUMMARY_COLUMNS)
    for row in rows:
        w.writerow([_cell(row.get(c), c) for c in SUMMARY_COLUMNS])
    return text.getvalue()


# --------------------------------------------------------------------------- entry point


METRICS = ("train", "eval")


def plot_runs(runs_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
              last_n: int | None = None, reps: int = 2000, seed: int = 0,
              metric: str | None = None) -> PlotResult:
    """Read every metrics.jsonl under ``runs_dir`` and write figures and summary.csv.

    ``metric``: 'train' or 'eval' returns; by default training returns, or evaluation
    returns where no run logged training returns (``choose_metric``).

    ``last_n``: iterations averaged for a run's final score, counted back from its game's
    common horizon (default 10% of the iterations up to it, at least 1).
    ``reps``/``seed``: bootstrap replications and seed for the IQM confidence intervals.
    """
    if last_n is not None and (not is_int(last_n) or last_n < 1):
        raise PlotError(f"last_n must be a positive integer, got {last_n!r}; pass --last_n 1 "
                        f"or more")
    if not is_int(reps) or reps < 1:
        raise PlotError(f"reps must be a positive integer, got {reps!r}; pass 1 or more")
    if metric is not None and metric not in METRICS:
        raise PlotError(f"metric {metric!r} is unknown; use one of {', '.join(METRICS)}")
    notes: list[str] = []
    runs = load_runs(runs_dir, notes)
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
        check_output_files(str(out / "summary.csv"))
    except (OSError, RunDirError) as e:
        problem = e.strerror if isinstance(e, OSError) else str(e)
        raise PlotError(f"cannot write plots to {out} ({problem}); pass a writable "
                        f"--out") from None

    if metric is None:
        metric = choose_metric(runs)
        if metric == "eval":
            notes.append("no training returns logged: plotted evaluation returns")
    if not any(np.isfinite(_values(r, metric)).any() for r in runs):
        raise PlotError(f"no run logged {metric} returns; pass --metric "
                        f"{'eval' if metric == 'train' else 'train'}, or runs that have them")
    final = final_scores(runs, metric, last_n, notes)
    panels = scaling_points(runs, final, reps=reps, seed=seed, notes=notes)
    colors = color_map([r.series for r in runs]
                       + [p[0] for pts in panels.values() for p in pts])
    # Everything is rendered first, then written file by file atomically: a figure that
    # cannot be drawn leaves the previous plots as they were.
    outputs: dict[str, bytes] = {}

    def render(fig, stem: str) -> None:
        for ext in ("png", "pdf"):
            path = str(out / f"{stem}.{ext}")
            try:
                outputs[path] = figure_bytes(fig, path, dpi=150)
            except (ValueError, OverflowError) as e:
                problem = " ".join(str(e).split())  # one line
                raise PlotError(f"cannot draw {stem} ({problem}); check the runs' "
                                f"metrics.jsonl for extreme values") from None

    render(learning_curves_figure(runs, colors, metric), "learning_curves")
    fig = aggregate_iqm_figure(runs, colors, metric, reps=reps, seed=seed, notes=notes)
    if fig is None:
        notes.append("aggregate_iqm: skipped, no Atari runs with human/random scores")
    else:
        render(fig, "aggregate_iqm")
    fig = scaling_figure(panels, colors, metric)
    if fig is None:
        notes.append("scaling: skipped, no run has a positive numeric scale and a return")
    else:
        render(fig, "scaling")
    summary = str(out / "summary.csv")
    outputs[summary] = summary_csv(summary_rows(runs, final, reps=reps, seed=seed,
                                                notes=notes)).encode("utf-8")
    for path, data in outputs.items():
        atomic_write_bytes(path, data)
    files = list(outputs)
    return PlotResult(out_dir=str(out), files=files, summary_csv=str(summary),
                      num_runs=len(runs), metric=metric, notes=list(dict.fromkeys(notes)),
                      colors=colors)
