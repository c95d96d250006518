"""Tests for experiments.plots on synthetic run directories (metrics.jsonl only)."""

import csv
import json
import math
import zlib

import numpy as np
import pytest
from matplotlib import colormaps

from experiments import plots
from experiments.plots import PlotError, plot_runs
from experiments.scores import human_normalized_score, load_human_random_scores

ITERS = 10
SEEDS = (0, 1, 2)
# (variant label in metrics or None, penultimate, scale, num_params)
ATARI_SETS = [(None, "dense", 1, 4_052_658), ("softmoe", "softmoe", 2, 500_000),
              ("softmoe", "softmoe", 8, 754_482)]
CARTPOLE_SETS = [(None, "dense", 1, 70_000), ("softmoe", "softmoe", 2, 40_000)]


def _returns(game, penultimate, scale, seed):
    rng = np.random.default_rng(zlib.crc32(f"{game}/{penultimate}/{scale}/{seed}".encode()))
    base = {"pong": -21.0, "breakout": 2.0, "CartPole-v1": 20.0}[game]
    slope = {"pong": 3.5, "breakout": 4.0, "CartPole-v1": 40.0}[game] * (1 + 0.1 * scale)
    return [base + slope * i + float(rng.normal(0, 1)) for i in range(ITERS)]


def write_run(root, variant, penultimate, scale, num_params, game, seed, *, atari,
              returns=None, eval_only=False, torn=False):
    run_dir = root / game / f"{variant or penultimate}-{scale}" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    returns = returns if returns is not None else _returns(game, penultimate, scale, seed)
    lines = []
    for i, ret in enumerate(returns):
        steps = (i + 1) * 1000
        row = {"iteration": i, "agent_steps": steps, "frames": 4 * steps if atari else steps,
               "train_episode_return_mean": None if eval_only else ret,
               "train_episodes": 3, "eval_episode_return_mean": ret if eval_only else None,
               "agent_steps_per_second": 100.0, "loss": 0.1, "game": game, "is_atari": atari,
               "seed": seed, "agent": "dqn", "penultimate": penultimate,
               "num_experts": None if penultimate == "dense" else scale, "scale": scale,
               "num_params": num_params, "variant": variant}
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"iteration": 10, "train_episode_ret'
    (run_dir / "metrics.jsonl").write_text(text)
    return returns


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    expected = {}
    for game in ("pong", "breakout"):
        for variant, pen, scale, params in ATARI_SETS:
            for seed in SEEDS:
                rets = _returns(game, pen, scale, seed)
                if seed == 1:
                    rets[0] = None  # no episode finished in the first iteration
                write_run(root, variant, pen, scale, params, game, seed, atari=True,
                          returns=rets, torn=(seed == 2))
                expected[(variant or f"dqn-{pen}", scale, game, seed)] = rets
    for variant, pen, scale, params in CARTPOLE_SETS:
        for seed in SEEDS:
            rets = write_run(root, variant, pen, scale, params, "CartPole-v1", seed, atari=False)
            expected[(variant or f"dqn-{pen}", scale, "CartPole-v1", seed)] = rets
    return root, expected


@pytest.fixture(scope="module")
def plotted(runs_dir, tmp_path_factory):
    root, _ = runs_dir
    return plot_runs(root, reps=200)


def read_summary(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_files_exist_and_are_non_empty(plotted, runs_dir):
    root, _ = runs_dir
    out = root / "plots"
    assert plotted.out_dir == str(out)
    for stem in ("learning_curves", "aggregate_iqm", "scaling"):
        png = (out / f"{stem}.png").read_bytes()
        pdf = (out / f"{stem}.pdf").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        assert pdf.startswith(b"%PDF") and len(pdf) > 2_000
    assert (out / "summary.csv").stat().st_size > 0
    assert plotted.num_runs == 18 + 6
    assert plotted.metric == "train"


def test_summary_final_scores_match_metrics(plotted, runs_dir):
    _, expected = runs_dir
    rows = read_summary(plotted.summary_csv)
    assert list(rows[0]) == plots.SUMMARY_COLUMNS
    run_rows = [r for r in rows if r["level"] == "run"]
    assert len(run_rows) == len(expected)
    for row in run_rows:
        scale = int(row["scale"])
        rets = [v for v in expected[(row["variant"], scale, row["game"], int(row["seed"]))]
                if v is not None]
        last_n = max(1, ITERS // 10)
        assert int(row["last_n"]) == last_n
        want = float(np.mean(rets[-last_n:]))
        assert float(row["final_score"]) == want
        if row["game"] == "CartPole-v1":
            assert row["hns"] == ""
        else:
            assert float(row["hns"]) == pytest.approx(human_normalized_score(row["game"], want))


def test_summary_with_explicit_last_n(runs_dir, tmp_path):
    root, expected = runs_dir
    result = plot_runs(root, tmp_path / "p", last_n=3, reps=100)
    rows = read_summary(result.summary_csv)
    for row in (r for r in rows if r["level"] == "run"):
        rets = [v for v in expected[(row["variant"], int(row["scale"]), row["game"],
                                     int(row["seed"]))] if v is not None]
        assert float(row["final_score"]) == float(np.mean(rets[-3:]))
    games = [r for r in rows if r["level"] == "game"]
    pong_dense = next(r for r in games if r["game"] == "pong" and r["variant"] == "dqn-dense")
    seeds = [np.mean([v for v in expected[("dqn-dense", 1, "pong", s)] if v is not None][-3:])
             for s in SEEDS]
    assert float(pong_dense["final_score"]) == pytest.approx(np.mean(seeds))
    assert int(pong_dense["num_runs"]) == 3
    assert float(pong_dense["ci_low"]) < float(pong_dense["final_score"]) < float(
        pong_dense["ci_high"])
    aggs = [r for r in rows if r["level"] == "aggregate"]
    assert {r["series"] for r in aggs} == {"dqn-dense", "softmoe (scale 2)", "softmoe (scale 8)"}
    assert all(r["game"] == "atari" and int(r["num_runs"]) == 6 for r in aggs)
    assert all(int(r["num_games"]) == 2 for r in aggs)
    assert all(float(r["ci_low"]) <= float(r["iqm"]) <= float(r["ci_high"]) for r in aggs)


def test_colour_map_is_fixed_and_consistent(plotted, runs_dir):
    cmap = plots.color_map(["b", "a", "c", "a"])
    tab10 = colormaps["tab10"]
    assert cmap == {"a": tuple(tab10(0)), "b": tuple(tab10(1)), "c": tuple(tab10(2))}
    assert plots.color_map(["c", "b", "a"]) == cmap
    root, _ = runs_dir
    runs = plots.load_runs(root)
    labels = {r.series for r in runs}
    assert labels == {"dqn-dense", "softmoe (scale 2)", "softmoe (scale 8)"}
    colors = plotted.colors
    for label in labels:
        assert colors[label] == plots.color_map(colors)[label]
    fig = plots.learning_curves_figure(runs, colors, "train")
    seen = 0
    for ax in fig.axes:
        for line in ax.get_lines():
            assert tuple(matplotlib_rgba(line.get_color())) == colors[line.get_label()]
            seen += 1
    assert seen == 3 + 3 + 2  # pong, breakout: 3 series; CartPole: 2
    # The learning curves of one game hold one line per series with frames on x.
    pong_ax = next(ax for ax in fig.axes if ax.get_title().startswith("pong"))
    assert pong_ax.get_xlabel() == "frames (millions)"
    cart_ax = next(ax for ax in fig.axes if ax.get_title().startswith("CartPole"))
    assert cart_ax.get_xlabel() == "agent steps"
    x = pong_ax.get_lines()[0].get_xdata()
    np.testing.assert_allclose(x, [4 * 1000 * (i + 1) / 1e6 for i in range(ITERS)])


def matplotlib_rgba(c):
    from matplotlib.colors import to_rgba
    return to_rgba(c)


def test_scaling_lines_per_penultimate_type(runs_dir):
    root, _ = runs_dir
    runs = plots.load_runs(root)
    final = plots.final_scores(runs, "train", None, [])
    panels = plots.scaling_points(runs, final, reps=100, seed=0, notes=[])
    atari = panels["Atari: IQM human-normalised score"]
    # A penultimate type run under one variant is labelled by that variant, as
    # in the learning curves, so it keeps one colour across figures.
    assert sorted((p[0], p[1]) for p in atari) == [
        ("dqn-dense", 1), ("softmoe", 2), ("softmoe", 8)]
    assert next(p for p in atari if p[1] == 8)[2] == 754_482
    cart = panels["CartPole-v1: mean return (raw)"]
    assert sorted(p[1] for p in cart) == [1, 2]


def test_eval_only_runs_use_eval_returns(tmp_path):
    for seed in SEEDS:
        write_run(tmp_path, None, "dense", 1, 100, "CartPole-v1", seed, atari=False,
                  eval_only=True)
    result = plot_runs(tmp_path, reps=50)
    assert result.metric == "eval"
    assert any("aggregate_iqm: skipped" in n for n in result.notes)
    assert not (tmp_path / "plots" / "aggregate_iqm.png").exists()
    rows = read_summary(result.summary_csv)
    assert all(r["final_score"] != "" for r in rows if r["level"] in ("run", "game"))


def test_no_runs_raises_plot_error(tmp_path):
    with pytest.raises(PlotError, match="no metrics.jsonl found"):
        plot_runs(tmp_path)
    with pytest.raises(PlotError, match="does not exist"):
        plot_runs(tmp_path / "missing")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"iteration": 0, "trai')
    with pytest.raises(PlotError, match="no usable runs"):
        plot_runs(tmp_path)
    with pytest.raises(PlotError, match="last_n"):
        plot_runs(tmp_path, last_n=0)


def test_damaged_and_repeated_lines_are_skipped(tmp_path):
    rets = write_run(tmp_path, None, "dense", 1, 100, "CartPole-v1", 0, atari=False,
                     torn=True)
    path = next(tmp_path.rglob("metrics.jsonl"))
    lines = path.read_bytes().split(b"\n")
    repeated = json.loads(lines[3])
    repeated["train_episode_return_mean"] = 1234.0  # A resumed run relogged iteration 3.
    lines[1:1] = [b'{"itera', b"[1]", b"\xff\xfe", b'{"no_iteration": 1}',
                  b'{"iteration": true}']
    lines.insert(-1, json.dumps(repeated).encode())
    path.write_bytes(b"\n".join(lines))
    (run,) = plots.load_runs(tmp_path)
    assert run.iterations.tolist() == list(range(ITERS))
    assert run.train_return.tolist() == rets[:3] + [1234.0] + rets[4:]


def test_a_number_beyond_float_range_reads_as_missing(tmp_path):
    write_run(tmp_path, None, "dense", 1, 100, "CartPole-v1", 0, atari=False)
    path = next(tmp_path.rglob("metrics.jsonl"))
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"agent_steps": 3000', '"agent_steps": 1' + "0" * 400)
    path.write_text("\n".join(lines) + "\n")
    (run,) = plots.load_runs(tmp_path)
    assert math.isnan(run.agent_steps[2]) and run.agent_steps[1] == 2000


def test_unwritable_out_names_the_out_flag(tmp_path):
    write_run(tmp_path / "runs", None, "dense", 1, 100, "CartPole-v1", 0, atari=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(PlotError, match=r"pass a writable --out$") as raised:
        plot_runs(tmp_path / "runs", tmp_path / "file" / "plots", reps=10)
    assert "--out_dir" not in str(raised.value)


def _hns_returns(game, hns, iters=ITERS):
    """Constant returns with human-normalised score ``hns`` (a list per iteration when given)."""
    random_score, human = load_human_random_scores()[game]
    values = hns if isinstance(hns, list) else [hns] * iters
    return [random_score + h * (human - random_score) for h in values]


def _atari_points(root, games_at_scale):
    """softmoe runs (3 seeds) of {scale: {game: hns}}; returns the loaded runs."""
    for scale, games in games_at_scale.items():
        for game, hns in games.items():
            for seed in SEEDS:
                write_run(root, "softmoe", "softmoe", scale, 1000 * scale, game, seed,
                          atari=True, returns=_hns_returns(game, hns))
    return plots.load_runs(root)


def test_scaling_and_aggregates_compare_the_same_games(tmp_path):
    runs = _atari_points(tmp_path, {1: {"pong": 0.1, "breakout": 3.0}, 2: {"pong": 0.1}})
    notes = []
    final = plots.final_scores(runs, "train", None, [])
    panels = plots.scaling_points(runs, final, reps=50, seed=0, notes=notes)
    atari = panels["Atari: IQM human-normalised score"]
    assert [(p[1], p[6]) for p in atari] == [(1, 3), (2, 3)]  # 3 seeds x pong only
    for p in atari:
        assert p[3] == pytest.approx(0.1)
    assert any("scaling (Atari panel)" in n and "left out breakout" in n for n in notes)
    notes = []
    rows = plots.summary_rows(runs, final, reps=50, seed=0, notes=notes)
    aggs = [r for r in rows if r["level"] == "aggregate"]
    assert [(r["series"], r["num_games"], r["num_runs"]) for r in aggs] == [
        ("softmoe (scale 1)", 1, 3), ("softmoe (scale 2)", 1, 3)]
    assert all(r["iqm"] == pytest.approx(0.1) for r in aggs)
    assert any("summary aggregate rows" in n and "left out breakout" in n for n in notes)


def test_no_common_game_skips_the_atari_panel_and_aggregates(tmp_path):
    runs = _atari_points(tmp_path, {1: {"pong": 0.1}, 2: {"breakout": 3.0}})
    notes = []
    final = plots.final_scores(runs, "train", None, [])
    panels = plots.scaling_points(runs, final, reps=50, seed=0, notes=notes)
    rows = plots.summary_rows(runs, final, reps=50, seed=0, notes=notes)
    assert "Atari: IQM human-normalised score" not in panels
    assert not [r for r in rows if r["level"] == "aggregate"]
    assert any(n.startswith("scaling (Atari panel): skipped") for n in notes)
    assert any(n.startswith("summary aggregate rows: skipped") for n in notes)


@pytest.mark.parametrize("last_n, want", [(None, 0.09), (5, 0.07)])
def test_final_scores_use_the_iterations_all_runs_reached(tmp_path, last_n, want):
    for seed, iters in zip(SEEDS, (100, 100, 10)):
        write_run(tmp_path, None, "dense", 1, 1000, "pong", seed, atari=True,
                  returns=_hns_returns("pong", [i / 100 for i in range(iters)]))
    result = plot_runs(tmp_path, last_n=last_n, reps=50)
    rows = read_summary(result.summary_csv)
    run_rows = [r for r in rows if r["level"] == "run"]
    assert [int(r["num_iterations"]) for r in run_rows] == [100, 100, 10]
    for row in run_rows:
        assert int(row["final_iteration"]) == 9
        assert int(row["last_n"]) == (last_n or 1)
        assert float(row["hns"]) == pytest.approx(want)
    (agg,) = [r for r in rows if r["level"] == "aggregate"]
    assert float(agg["iqm"]) == pytest.approx(want)
    runs = plots.load_runs(tmp_path)
    final = plots.final_scores(runs, "train", last_n, [])
    panels = plots.scaling_points(runs, final, reps=50, seed=0, notes=[])
    (point,) = panels["Atari: IQM human-normalised score"]
    assert point[3] == pytest.approx(want)
    assert any(n.startswith("final scores of pong: taken up to iteration 9") and
               "2 longer run(s)" in n for n in result.notes)


def test_a_figure_that_cannot_be_drawn_leaves_the_previous_plots(tmp_path):
    out = tmp_path / "plots"
    write_run(tmp_path / "good", None, "dense", 1, 1000, "pong", 0, atari=True,
              returns=[1.0, 2.0, 3.0])
    result = plot_runs(tmp_path / "good", out, reps=50)
    before = {f: open(f, "rb").read() for f in result.files}
    # Valid JSON, but no axis can be ticked across it.
    write_run(tmp_path / "bad", None, "dense", 1, 1000, "pong", 0, atari=True,
              returns=[1e308, 1e308])
    with pytest.raises(PlotError, match="cannot draw learning_curves"):
        plot_runs(tmp_path / "bad", out, reps=50)
    assert {f: open(f, "rb").read() for f in result.files} == before


def test_one_seed_has_no_interval_in_summary(tmp_path):
    write_run(tmp_path, None, "dense", 1, 1000, "pong", 0, atari=True,
              returns=[1.0, 2.0, 3.0])
    rows = read_summary(plot_runs(tmp_path, reps=50).summary_csv)
    (game,) = [r for r in rows if r["level"] == "game"]
    assert game["num_runs"] == "1" and float(game["final_score"]) == 3.0
    assert game["ci_low"] == game["ci_high"] == ""  # not a zero-width interval


def test_metric_chooses_the_returns_plotted(tmp_path):
    root = tmp_path / "runs"
    write_run(root, None, "dense", 1, 1000, "pong", 0, atari=True, returns=[1.0, 2.0])
    train = plot_runs(root, tmp_path / "a", reps=50)
    assert train.metric == "train"
    # These runs logged no evaluation returns: asking for them is refused.
    with pytest.raises(PlotError, match="no run logged eval returns; pass --metric train"):
        plot_runs(root, tmp_path / "b", reps=50, metric="eval")
    with pytest.raises(PlotError, match="metric 'test' is unknown"):
        plot_runs(root, tmp_path / "b", reps=50, metric="test")
    evals = tmp_path / "evals"
    write_run(evals, None, "dense", 1, 1000, "pong", 0, atari=True, returns=[5.0, 7.0],
              eval_only=True)
    result = plot_runs(evals, tmp_path / "c", reps=50, metric="eval")
    (run,) = [r for r in read_summary(result.summary_csv) if r["level"] == "run"]
    assert result.metric == "eval" and float(run["final_score"]) == 7.0
