"""Tests for experiments.sweeps: spec loading, expansion, dry runs and execution.

Execution tests use a tiny fake trainer script (written into tmp_path) in place of
``moerl train``; the real end-to-end CartPole sweep lives with the CLI tests.
"""

import contextlib
import io
import json
import os
import re
import shutil
import socket
import sys
import textwrap
import threading
import tomllib
import types

import pytest

from experiments import gin_config, sweeps
from experiments.run_dir import RunDir, RunDirError
from experiments.sweeps import SweepError, expand, gin_literal, load_spec, run_sweep

FAKE_TRAINER = textwrap.dedent('''
    """Mimics `moerl train`: --base_dir, --gin_files, --gin_bindings (repeatable); writes
    status.json, metrics.jsonl, config.gin and one checkpoint per Runner.num_iterations."""
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("--base_dir", required=True)
    p.add_argument("--gin_files", action="append", default=[])
    p.add_argument("--gin_bindings", action="append", default=[])
    a = p.parse_args()
    os.makedirs(a.base_dir, exist_ok=True)
    with open(os.path.join(a.base_dir, "invocations.txt"), "a") as fh:
        fh.write(json.dumps(a.gin_bindings) + "\\n")
    print("starting", a.base_dir, flush=True)
    def status(state, error=None):
        with open(os.path.join(a.base_dir, "status.json"), "w") as fh:
            json.dump({"state": state, "error": error, "iteration": 0}, fh)
    status("running")
    if any("bad" in b for b in a.gin_bindings):
        status("failed", "ValueError: bad value")
        print("error: the binding is bad; fix it", file=sys.stderr)
        sys.exit(1)
    with open(os.path.join(a.base_dir, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps({"iteration": 0, "train_episode_return_mean": 1.0}) + "\\n")
    with open(os.path.join(a.base_dir, "config.gin"), "w") as fh:
        fh.write("\\n".join(a.gin_bindings) + "\\n")
    counts = [int(b.split("=")[1]) for b in a.gin_bindings
              if b.startswith("Runner.num_iterations")]
    for i in range(counts[-1] if counts else 1):  # as moerl train: checkpoints/ckpt_<i>
        os.makedirs(os.path.join(a.base_dir, "checkpoints", f"ckpt_{i}"), exist_ok=True)
    status("done")
''')


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def gin_dir(tmp_path):
    (tmp_path / "a.gin").write_text("# a\n")
    (tmp_path / "b.gin").write_text("# b\n")
    return tmp_path


@pytest.fixture
def fake_trainer(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)
    return (sys.executable, str(script))


def invocations(run_dir):
    path = run_dir / "invocations.txt"
    return path.read_text().splitlines() if path.exists() else []


def snapshot(root):
    """Every file under root with its bytes and mtime: equal snapshots mean untouched."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


FULL_SPEC = """
    name = "full"
    gin_files = ["a.gin"]
    bindings = ["Runner.num_iterations = 2"]
    games = ["Pong", "Breakout"]
    seeds = [0, 1, 2]
    [grid]
    "Runner.flag" = [true, false]
    [[zip]]
    "SoftMoE.num_experts" = [1, 2, 4, 8]
    "SoftMoE.expert_hidden_units" = [512, 256, 128, 64]
    [[variants]]
    name = "dense"
    gin_files = ["b.gin"]
    [[variants]]
    name = "softmoe"
    bindings = ["SoftMoE.normalize = True"]
"""


# --------------------------------------------------------------------------- expansion


def test_expansion_counts_grid_zip_games_seeds_variants(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", FULL_SPEC))
    runs = expand(spec)
    # grid 2 x zip 4 x games 2 x seeds 3 x variants 2
    assert len(runs) == 2 * 4 * 2 * 3 * 2
    assert len({r.name for r in runs}) == len(runs)
    dense = [r for r in runs if r.variant == "dense"]
    soft = [r for r in runs if r.variant == "softmoe"]
    assert len(dense) == len(soft) == 48
    assert all(r.gin_files == (str(gin_dir / "b.gin"),) for r in dense)
    assert all(r.gin_files == (str(gin_dir / "a.gin"),) for r in soft)
    assert all("SoftMoE.normalize = True" in r.bindings for r in soft)
    assert not any("SoftMoE.normalize = True" in r.bindings for r in dense)
    assert all(r.bindings[0] == "Runner.num_iterations = 2" for r in runs)


def test_zipped_axes_move_together(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", FULL_SPEC))
    pairs = {(r.axes["SoftMoE.num_experts"], r.axes["SoftMoE.expert_hidden_units"])
             for r in expand(spec)}
    assert pairs == {(1, 512), (2, 256), (4, 128), (8, 64)}


def test_default_names_and_bindings(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", FULL_SPEC))
    run = expand(spec)[0]
    assert run.name == "Pong/dense/flag=True,num_experts=1,expert_hidden_units=512/seed0"
    assert run.bindings == (
        "Runner.num_iterations = 2", "Runner.flag = True", "SoftMoE.num_experts = 1",
        "SoftMoE.expert_hidden_units = 512", "create_atari_environment.game_name = 'Pong'",
        "Runner.seed = 0")
    assert (run.game, run.seed, run.variant) == ("Pong", 0, "dense")


def test_name_template_with_short_names(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", """
        name = "t"
        gin_files = ["a.gin"]
        games = ["Pong"]
        seeds = [0, 1]
        name_template = "{game}/e{num_experts}/{seed}"
        game_binding = "Env.game"
        seed_binding = "Run.seed"
        [grid]
        "SoftMoE.num_experts" = [1, 2]
    """))
    runs = expand(spec)
    assert [r.name for r in runs] == ["Pong/e1/0", "Pong/e1/1", "Pong/e2/0", "Pong/e2/1"]
    assert "Env.game = 'Pong'" in runs[0].bindings and "Run.seed = 1" in runs[1].bindings


def test_names_are_filesystem_safe(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", """
        name = "t"
        gin_files = ["a.gin"]
        name_template = "{opt}"
        [grid]
        "Agent.opt" = ["a b", "../x", "c:d"]
    """))
    names = [r.name for r in expand(spec)]
    assert names == ["a_b", "__/x", "c_d"]


def test_gin_literals():
    assert gin_literal(True) == "True" and gin_literal(False) == "False"
    assert gin_literal(3) == "3" and gin_literal(0.5) == "0.5" and gin_literal(1e-4) == "0.0001"
    assert gin_literal("Pong") == "'Pong'"
    assert gin_literal("it's") == '"it\'s"'
    assert gin_literal("@networks.NatureCNN") == "@networks.NatureCNN"
    assert gin_literal("%GAME") == "%GAME"
    assert gin_literal([1, "a", True]) == "[1, 'a', True]"
    assert gin_literal({"k": 2}) == "{'k': 2}"


def test_variant_axes_and_variant_binding(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", """
        name = "scaling"
        gin_files = ["a.gin"]
        seeds = [0]
        variant_binding = "Runner.variant"
        [[variants]]
        name = "dense"
        [variants.grid]
        "DensePenultimate.width_scale" = [1, 2, 4]
        [[variants]]
        name = "softmoe"
        [variants.grid]
        "SoftMoE.num_experts" = [1, 2, 4, 8]
    """))
    runs = expand(spec, validate_binding=gin_config.validate_binding)
    assert len(runs) == 7
    assert runs[0].name == "dense/width_scale=1/seed0"
    assert "Runner.variant = 'dense'" in runs[0].bindings
    assert "Runner.variant = 'softmoe'" in runs[-1].bindings


def docstring_example():
    """The spec example in the module docstring, parsed."""
    block = sweeps.__doc__.split("::\n", 1)[1].split("\nNumber of runs", 1)[0]
    return tomllib.loads(textwrap.dedent(block))


def test_docstring_example_names_real_gin_parameters(tmp_path):
    # Its axis tables are illustrations that do not combine into one sweep, so every
    # target it names is bound once in a spec of its own, dry-run with gin validation.
    example = docstring_example()
    (variant,) = example["variants"]
    axes = {**example["grid"], **variant["grid"]}
    for table in example["zip"]:
        axes.update(table)
    bindings = [*example["bindings"], *variant["bindings"],
                *(f"{k} = {gin_literal(v[0])}" for k, v in axes.items()),
                f"{example['variant_binding']} = {gin_literal(variant['name'])}"]
    assert "DensePenultimate.width_scale = 1" in bindings
    fields = {k: example[k] for k in ("games", "seeds", "game_binding", "seed_binding")}
    path = tmp_path / "example.toml"
    path.write_text("\n".join(
        [f"name = {json.dumps(example['name'])}",
         f"gin_files = {json.dumps(example['gin_files'] + variant['gin_files'])}",
         f"bindings = {json.dumps(bindings)}",
         *(f"{k} = {json.dumps(v)}" for k, v in fields.items())]) + "\n")
    result = run_sweep(path, tmp_path / "out", dry_run=True, stream=io.StringIO(),
                       validate_binding=gin_config.validate_binding)
    assert len(result.runs) == len(example["games"]) * len(example["seeds"])
    assert not (tmp_path / "out").exists()


def test_validate_binding_called_on_every_distinct_binding(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", FULL_SPEC))
    seen = []
    expand(spec, validate_binding=seen.append)
    assert len(seen) == len(set(seen))
    assert "SoftMoE.num_experts = 8" in seen and "Runner.seed = 2" in seen


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text, fragment", [
    ('name = "x"\ngin_files = ["a.gin"\n', "not valid TOML"),
    ('name = "x"\ngin_files = ["a.gin"]\nbogus = 1\n', "unknown top-level key"),
    ('name = "x"\ngin_files = ["a.gin"]\n[grid]\n"A.b" = 3\n', "must be a list"),
    ('name = "x"\ngin_files = ["a.gin"]\n[grid]\n"A.b" = []\n', "zero runs"),
    ('name = "x"\ngin_files = ["a.gin"]\nseeds = []\n', "zero runs"),
    ('name = "x"\ngin_files = ["a.gin"]\n[[zip]]\n"A.b" = [1, 2]\n"A.c" = [1]\n',
     "unequal lengths"),
    ('name = "x"\ngin_files = ["missing.gin"]\n', "'missing.gin' not found"),
    ('gin_files = ["a.gin"]\n', "'name' is missing"),
    ('name = "x"\ngin_files = ["a.gin"]\nname_template = "{nope}"\n', "unknown field {nope}"),
    ('name = "x"\ngin_files = ["a.gin"]\nseeds = [0]\nname_template = "{seed:>99999999999}"\n',
     "field width too large"),
    ('name = "x"\ngin_files = ["a.gin"]\nseeds = [0]\nname_template = "x{seed:0>300}"\n',
     "longer than 255 bytes"),
    ('name = "x"\ngin_files = ["a.gin"]\nname_template = "same"\nseeds = [0, 1]\n',
     "more than one run"),
    ('name = "x"\ngin_files = ["a.gin"]\n[grid]\n"A.b" = [1]\n[[zip]]\n"A.b" = [2]\n',
     "more than one axis table"),
    ('name = "x"\ngin_files = ["a.gin"]\nseeds = [0, -1]\n', "holds -1, but seeds must be"),
    ('name = "x"\ngin_files = ["a.gin"]\ngames = ["Pong", "NotAGame"]\n',
     "unknown Atari game 'NotAGame'"),
    ('name = "x"\ngin_files = ["a.gin"]\ngames = ["Pongg"]\n'
     'game_binding = "train/create_atari_environment.game_name"\n', "did you mean 'pong'"),
    ('name = "x"\ngin_files = ["a.gin"]\ngames = ["CartPole", "CartPol"]\n'
     'game_binding = "create_gym_environment.environment_name"\n',
     "unknown gym environment 'CartPol': did you mean 'CartPole'"),
])
def test_bad_specs_raise_sweep_error(gin_dir, text, fragment):
    path = gin_dir / "bad.toml"
    path.write_text(text)
    with pytest.raises(SweepError) as info:
        expand(load_spec(path))
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_malformed_toml_reports_line(gin_dir):
    path = gin_dir / "bad.toml"
    path.write_text('name = "x"\n\ngin_files = [\n"a.gin",,\n]\n')
    with pytest.raises(SweepError, match=r"line 4"):
        load_spec(path)


@pytest.mark.parametrize("table", ["[[zip]]", "[grid]"])
def test_empty_grid_is_refused(gin_dir, table):
    path = write(gin_dir / "s.toml", f"""
        name = "x"
        gin_files = ["a.gin"]
        {table}
    """)
    with pytest.raises(SweepError, match="empty"):
        load_spec(path)


def test_unknown_axis_parameter_via_validate_binding(gin_dir, fake_trainer, tmp_path):
    path = write(gin_dir / "s.toml", """
        name = "x"
        gin_files = ["a.gin"]
        [grid]
        "SoftMoE.num_expertz" = [1, 2]
    """)

    def validate(binding):
        if "num_expertz" in binding:
            raise ValueError("No configurable matching 'SoftMoE.num_expertz'")

    with pytest.raises(SweepError, match="bad axis 'SoftMoE.num_expertz': No configurable"):
        expand(load_spec(path), validate_binding=validate)
    out = tmp_path / "out"
    with pytest.raises(SweepError):
        run_sweep(path, out, command_prefix=fake_trainer, validate_binding=validate)
    assert not out.exists()  # nothing started, nothing written


def _config_of(used):
    """A fake effective_configs: a config is its file names and the bindings whose
    configurable its gin file builds (``used``: file name -> configurables; gin's
    operative config keeps only the parameters the built config uses); it records each
    config it builds, and whether it was closed."""
    calls, closed = [], []

    def effective_configs(configs):
        try:
            for gin_files, bindings in configs:
                calls.append((tuple(gin_files), tuple(bindings)))
                if any("-1" in b for b in bindings):
                    raise ValueError("bad config: SoftMoE.num_experts=-1 must be >= 1.")
                builds = set().union(*(used[os.path.basename(f)] for f in gin_files))
                kept = [b for b in bindings if b.split(".", 1)[0] in builds]
                yield ("\n".join([*gin_files, *sorted(kept)]),
                       [b for b in bindings if b not in kept])
        finally:
            closed.append(True)

    effective_configs.closed = closed
    return effective_configs, calls


def test_check_configs_builds_each_config_once_with_the_first_game_and_seed(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", FULL_SPEC))
    runs = expand(spec)
    builds = {"Runner", "SoftMoE", "create_atari_environment"}
    effective_configs, calls = _config_of(used={"a.gin": builds, "b.gin": builds})
    sweeps.check_configs(spec, runs, effective_configs)
    # 2 variants x 2 flags x 4 zipped expert counts; games and seeds aside.
    assert len(calls) == 16 and len(set(calls)) == 16
    for _, bindings in calls:
        assert "create_atari_environment.game_name = 'Pong'" in bindings
        assert "Runner.seed = 0" in bindings
        assert not any("Breakout" in b or "Runner.seed = 1" in b for b in bindings)


def test_check_configs_refuses_runs_that_would_train_the_same_config(gin_dir, fake_trainer,
                                                                    tmp_path):
    path = write(gin_dir / "s.toml", """
        name = "x"
        gin_files = ["a.gin"]
        seeds = [0, 1]
        [grid]
        "SoftMoE.num_experts" = [1, 2]
        [[variants]]
        name = "moe"
        [[variants]]
        name = "dense"
        gin_files = ["b.gin"]
    """)
    spec = load_spec(path)
    # b.gin builds no SoftMoE: its two expert counts give one config.
    effective_configs, calls = _config_of(used={"a.gin": {"Runner", "SoftMoE"},
                                                "b.gin": {"Runner"}})
    with pytest.raises(SweepError, match=r"runs 'dense/num_experts=1/seed0' and "
                       r"'dense/num_experts=2/seed0' would train the same config: they "
                       r"differ only in SoftMoE.num_experts"):
        sweeps.check_configs(spec, expand(spec), effective_configs)
    assert len(calls) == 4 and effective_configs.closed  # the builder is stopped
    out = tmp_path / "out"
    for dry_run in (True, False):
        with pytest.raises(SweepError, match="would train the same config"):
            run_sweep(path, out, dry_run=dry_run, command_prefix=fake_trainer,
                      effective_configs=effective_configs, stream=io.StringIO())
    assert not out.exists()  # refused before anything ran or was written
    # Where every config uses the axis, the same sweep passes.
    effective_configs, calls = _config_of(used={"a.gin": {"Runner", "SoftMoE"},
                                                "b.gin": {"Runner", "SoftMoE"}})
    sweeps.check_configs(spec, expand(spec), effective_configs)
    assert len(calls) == 4


def test_check_configs_refuses_variants_with_the_same_files_and_bindings(gin_dir):
    spec = load_spec(write(gin_dir / "s.toml", """
        name = "x"
        gin_files = ["a.gin"]
        [[variants]]
        name = "first"
        [[variants]]
        name = "second"
    """))
    effective_configs, calls = _config_of(used={"a.gin": {"Runner"}})
    with pytest.raises(SweepError, match="variants 'first' and 'second' have the same gin "
                       "files and bindings"):
        sweeps.check_configs(spec, expand(spec), effective_configs)
    assert calls == []  # refused before anything was built


@pytest.mark.parametrize("extra,fragment", [
    ('games = ["Pong", "Breakout"]\n',
     "run 'Pong' does not use its game binding \"create_atari_environment.game_name = "
     "'Pong'\", so every game would train the same run; set game_binding"),
    ('seeds = [0, 1]\nseed_binding = "DQNAgent.seed"\n',
     "run 'seed0' does not use its seed binding 'DQNAgent.seed = 0', so every seed would "
     "train the same run; set seed_binding"),
], ids=["game", "seed"])
def test_check_configs_refuses_a_game_or_seed_binding_without_effect(gin_dir, extra,
                                                                     fragment):
    spec = load_spec(write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n' + extra))
    # a.gin builds a config that reads neither parameter (a gym env; a Runner seed).
    effective_configs, _ = _config_of(used={"a.gin": {"Runner"}})
    with pytest.raises(SweepError) as refused:
        sweeps.check_configs(spec, expand(spec), effective_configs)
    assert fragment in str(refused.value)
    effective_configs, _ = _config_of(
        used={"a.gin": {"Runner", "DQNAgent", "create_atari_environment"}})
    sweeps.check_configs(spec, expand(spec), effective_configs)


def test_check_configs_refuses_a_config_that_does_not_build(gin_dir, fake_trainer, tmp_path):
    path = write(gin_dir / "s.toml", """
        name = "x"
        gin_files = ["a.gin"]
        [grid]
        "SoftMoE.num_experts" = [2, -1]
    """)
    effective_configs, _ = _config_of(used={"a.gin": {"SoftMoE"}})
    out = tmp_path / "out"
    with pytest.raises(SweepError, match=r"run 'num_experts=-1': bad config: "
                       r"SoftMoE.num_experts=-1 must be >= 1"):
        run_sweep(path, out, command_prefix=fake_trainer, effective_configs=effective_configs,
                  stream=io.StringIO())
    assert not out.exists()


def test_dry_run_prints_plan_and_creates_nothing(gin_dir, tmp_path):
    path = write(gin_dir / "s.toml", FULL_SPEC)
    out = tmp_path / "out"
    stream = io.StringIO()
    result = run_sweep(path, out, dry_run=True, stream=stream,
                       command_prefix=("definitely-not-a-command",))
    text = stream.getvalue()
    assert result.dry_run and not result.done and not result.failed
    assert len(result.runs) == 96
    assert "96 run(s)" in text
    assert "Pong/dense/flag=True,num_experts=1,expert_hidden_units=512/seed0" in text
    assert "SoftMoE.num_experts = 8" in text
    assert not out.exists()


def test_foreign_out_dir_is_refused(gin_dir, fake_trainer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"sweep": "other", "runs": []}))
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0]\n')
    with pytest.raises(SweepError, match="holds sweep 'other'"):
        run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    (out / "manifest.json").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="not empty"):
        run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())


def test_out_dir_damage_is_refused_before_writing(gin_dir, fake_trainer, tmp_path):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0, 1]\n')
    out = tmp_path / "out"
    assert run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO()).ok
    # A file where a run keeps its directory (here the run is redone: no status).
    run = next(p for p in out.rglob("seed1") if p.is_dir())
    shutil.rmtree(run)
    run.write_text("mine")
    before = snapshot(out)
    with pytest.raises(SweepError, match="is a file where run .* keeps its directory"):
        run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    assert snapshot(out) == before
    run.unlink()
    # A manifest whose runs hold other types than the sweep writes.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["runs"][0]["gin_files"] = 3
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(out)
    with pytest.raises(SweepError, match="not a sweep manifest"):
        run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    assert snapshot(out) == before
    # out_dir itself a file.
    with pytest.raises(SweepError, match="is a file"):
        run_sweep(path, out / "manifest.json", dry_run=True, stream=io.StringIO())


@pytest.mark.parametrize("cpus, gpus", [(float("nan"), 0.0), (1.0, float("inf")),
                                        (-1.0, 0.0)])
def test_resource_requests_must_be_finite_and_non_negative(gin_dir, tmp_path, cpus, gpus):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    with pytest.raises(SweepError, match="must be finite and >= 0"):
        run_sweep(path, tmp_path / "out", dry_run=True, backend="ray", cpus_per_run=cpus,
                  gpus_per_run=gpus, stream=io.StringIO())
    assert not (tmp_path / "out").exists()


def finished_sweep(gin_dir, fake_trainer, out, seeds, num_iterations):
    """A done sweep of `seeds` at `num_iterations`, and a function that rewrites its
    spec with another single binding (returning the spec's path)."""
    spec = f'name = "x"\ngin_files = ["a.gin"]\nseeds = {seeds}\nbindings = ["{{b}}"]\n'
    respec = lambda binding: write(gin_dir / "s.toml", spec.format(b=binding))
    path = respec(f"Runner.num_iterations = {num_iterations}")
    assert run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO()).ok
    return respec


def test_a_changed_num_iterations_reruns_done_runs_and_nothing_else(gin_dir, fake_trainer,
                                                                      tmp_path):
    out = tmp_path / "out"
    respec = finished_sweep(gin_dir, fake_trainer, out, [0, 1], 2)
    runs = sorted(p.parent for p in out.rglob("invocations.txt"))
    # A larger Runner.num_iterations is the same sweep: each done run is run again (moerl
    # train resumes and extends it) ...
    path = respec("Runner.num_iterations = 5")
    plan = io.StringIO()
    run_sweep(path, out, dry_run=True, stream=plan)
    assert plan.getvalue().count("done, num_iterations changed") == 2
    result = run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    assert len(result.done) == 2 and not result.skipped
    for run in runs:
        assert [json.loads(line)[0] for line in invocations(run)] == [
            "Runner.num_iterations = 2", "Runner.num_iterations = 5"]
    # ... and once done at that size, skipped.
    again = run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    assert len(again.skipped) == 2 and not again.done
    # Any other binding still makes it another sweep.
    path = respec("Runner.training_steps = 5")
    with pytest.raises(SweepError, match="other gin files or bindings"):
        run_sweep(path, out, dry_run=True, stream=io.StringIO())


def test_a_lowered_num_iterations_is_refused_before_anything_is_written(gin_dir, fake_trainer,
                                                                        tmp_path):
    out = tmp_path / "out"
    respec = finished_sweep(gin_dir, fake_trainer, out, [0, 1], 2)
    before = snapshot(out)
    # Each run holds 2 finished iterations, which `moerl train` would refuse to shrink:
    # the sweep refuses it up front, in a dry run too, and leaves the manifest alone.
    path = respec("Runner.num_iterations = 1")
    for dry_run in (True, False):
        with pytest.raises(SweepError, match=r"holds run 'seed0' with 2 finished iterations, "
                           r"more than its Runner.num_iterations = 1; bind Runner."
                           r"num_iterations to 2 or more, or choose another out_dir") as e:
            run_sweep(path, out, dry_run=dry_run, command_prefix=fake_trainer,
                      stream=io.StringIO())
        assert "\n" not in str(e.value)
        assert snapshot(out) == before
    # So the sweep at its old size is still done.
    path = respec("Runner.num_iterations = 2")
    plan = io.StringIO()
    run_sweep(path, out, dry_run=True, stream=plan)
    assert plan.getvalue().count("done (skip)") == 2


def test_a_lowered_num_iterations_resumes_a_run_that_holds_no_more(gin_dir, fake_trainer,
                                                                    tmp_path):
    out = tmp_path / "out"
    respec = finished_sweep(gin_dir, fake_trainer, out, [0], 3)
    # Killed after checkpointing iteration 1 of 3: it holds 2, as many as the new count.
    shutil.rmtree(out / "seed0" / "checkpoints" / "ckpt_2")
    (out / "seed0" / "status.json").write_text('{"state": "failed", "iteration": 2}')
    path = respec("Runner.num_iterations = 2")
    result = run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    assert [o.name for o in result.done] == ["seed0"]
    assert [json.loads(line)[0] for line in invocations(out / "seed0")] == [
        "Runner.num_iterations = 3", "Runner.num_iterations = 2"]


def test_finished_iterations_agree_with_the_checkpointer(tmp_path):
    from experiments.checkpoints import Checkpointer
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for name in ("ckpt_0", "ckpt_3.old", "ckpt_5.tmp", "other"):
        (ckpts / name).mkdir(parents=True)
    (ckpts / "ckpt_9").write_text("a file, not a checkpoint")
    assert sweeps._finished_iterations(run) == 0  # no config.gin: moerl train starts over
    (run / "config.gin").write_text("Runner.num_iterations = 4\n")
    latest = Checkpointer(str(ckpts)).latest_iteration()
    assert latest == 3 and sweeps._finished_iterations(run) == latest + 1
    assert sweeps._finished_iterations(tmp_path / "missing") == 0


@pytest.mark.parametrize("bindings, count", [
    (["Runner.num_iterations = 2"], 2),
    (["Runner.num_iterations = 2", "A.b = 1", "Runner.num_iterations=7"], 7),
    (["A.b = 1"], None),
    (["Runner.num_iterations = %ITERS"], None),
])
def test_bound_num_iterations_is_the_last_binding(bindings, count):
    assert sweeps._bound_num_iterations(bindings) == count


def test_ray_address_needs_the_ray_backend(gin_dir, tmp_path):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    with pytest.raises(SweepError, match="needs the ray backend"):
        run_sweep(path, tmp_path / "out", dry_run=True, ray_address="head:6379",
                  stream=io.StringIO())


@pytest.mark.parametrize("cpus, gpus, flag", [(8.0, None, "cpus_per_run"),
                                              (0.5, None, "cpus_per_run"),
                                              (1.0, None, "cpus_per_run"),
                                              (None, 1.0, "gpus_per_run"),
                                              (None, 0.0, "gpus_per_run")])
@pytest.mark.parametrize("dry_run", [True, False])
def test_ray_resources_need_the_ray_backend(gin_dir, fake_trainer, tmp_path, cpus, gpus, flag,
                                            dry_run):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    out = tmp_path / "out"
    with pytest.raises(SweepError, match=rf"^{flag} \S+ applies to the ray backend only "
                       rf"\(local runs are not limited\); pass --backend ray, or drop "
                       rf"--{flag}$"):
        run_sweep(path, out, dry_run=dry_run, cpus_per_run=cpus, gpus_per_run=gpus,
                  command_prefix=fake_trainer, stream=io.StringIO())
    assert not out.exists()


def test_no_resource_request_is_fine_with_the_local_backend(gin_dir, tmp_path):
    # None is what `moerl sweep` passes when neither flag is given.
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    result = run_sweep(path, tmp_path / "out", dry_run=True, cpus_per_run=None,
                       gpus_per_run=None, stream=io.StringIO())
    assert result.dry_run and len(result.runs) == 1


def closed_port():
    """A local TCP port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeRay(types.ModuleType):
    """Stands in for the ``ray`` module: records init/shutdown and the task resources, and
    runs each task at once in this process."""

    def __init__(self, init_error=None):
        super().__init__("ray")
        self.init_error, self.calls, self.resources = init_error, [], []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        if self.init_error is not None:
            raise self.init_error

    def shutdown(self):
        self.calls.append(("shutdown", {}))

    def remote(self, **resources):
        self.resources.append(resources)
        return lambda fn: types.SimpleNamespace(remote=lambda *a: FakeRef(fn(*a)))

    def wait(self, pending, num_returns):
        return pending[:num_returns], pending[num_returns:]

    def get(self, ref):
        return ref.value


class FakeRef:
    """A finished task's object ref (hashable by identity, as Ray's are)."""

    def __init__(self, value):
        self.value = value


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_unreachable_ray_address_is_refused_before_anything_is_written(
        gin_dir, fake_trainer, tmp_path, monkeypatch, scheme):
    ray = FakeRay(AssertionError("ray.init must not be called"))
    monkeypatch.setitem(sys.modules, "ray", ray)
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    out = tmp_path / "out"
    address = f"{scheme}127.0.0.1:{closed_port()}"
    for dry_run in (True, False):
        with pytest.raises(SweepError, match=rf"^cannot reach the Ray cluster at "
                           rf"{re.escape(address)} \(.+\); start it \(ray start --head\) "
                           rf"or fix --ray_address$"):
            run_sweep(path, out, dry_run=dry_run, backend="ray", ray_address=address,
                      command_prefix=fake_trainer, stream=io.StringIO())
    assert not out.exists() and ray.calls == []


@pytest.mark.parametrize("address", ["head", "head:0", "head:65536", "::1:6379", "ray://head",
                                     ""])
def test_malformed_ray_address_is_refused(gin_dir, tmp_path, address):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    with pytest.raises(SweepError, match=r"is not 'auto', HOST:PORT or ray://HOST:PORT"):
        run_sweep(path, tmp_path / "out", dry_run=True, backend="ray", ray_address=address,
                  stream=io.StringIO())


@contextlib.contextmanager
def tcp_server(reply):
    """A local TCP server that answers every connection with `reply` once the client has
    sent something, then closes it; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed
                return
            with conn:
                conn.recv(64)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


# A gRPC server's first frame (Ray's GCS answered this very header when probed).
SETTINGS_FRAME = bytes.fromhex("000018040000000000")


def test_reachable_ray_address_passes_the_check(gin_dir, tmp_path):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    with tcp_server(SETTINGS_FRAME + bytes(24)) as port:
        for address in (f"127.0.0.1:{port}", f"ray://localhost:{port}"):
            result = run_sweep(path, tmp_path / "out", dry_run=True, backend="ray",
                               ray_address=address, stream=io.StringIO())
            assert result.dry_run and len(result.runs) == 1


@pytest.mark.parametrize("reply", [b"HTTP/1.0 400 Bad request\r\n\r\n", b""])
def test_a_ray_address_that_is_not_a_ray_server_is_refused(gin_dir, tmp_path, reply):
    # An HTTP/1 server, and one that closes without a word: ray.init would retry them.
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    with tcp_server(reply) as port:
        with pytest.raises(SweepError, match=rf"^127.0.0.1:{port} answers, but not as a Ray "
                           r"cluster \(no gRPC reply\)"):
            run_sweep(path, tmp_path / "out", dry_run=True, backend="ray",
                      ray_address=f"127.0.0.1:{port}", stream=io.StringIO())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["auto", None])
def test_failing_ray_init_is_a_one_line_sweep_error_and_writes_nothing(
        gin_dir, fake_trainer, tmp_path, monkeypatch, address):
    class GcsError(Exception):
        pass
    ray = FakeRay(GcsError("no Ray cluster is running\n  more detail"))
    monkeypatch.setitem(sys.modules, "ray", ray)
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    out = tmp_path / "out"
    with pytest.raises(SweepError, match=rf"^cannot start or reach Ray at {address or 'local'} "
                       r"\(no Ray cluster is running\); check --ray_address$"):
        run_sweep(path, out, backend="ray", ray_address=address, command_prefix=fake_trainer,
                  stream=io.StringIO())
    assert not out.exists()
    assert [c[0] for c in ray.calls] == ["init", "shutdown"]


def test_ray_tasks_get_one_cpu_and_no_gpu_by_default(gin_dir, fake_trainer, tmp_path,
                                                     monkeypatch):
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0, 1]\n')
    out = tmp_path / "out"
    result = run_sweep(path, out, backend="ray", workers=2, command_prefix=fake_trainer,
                       stream=io.StringIO())
    assert len(result.done) == 2 and (out / "manifest.json").exists()
    assert ray.resources == [{"num_cpus": 1.0, "num_gpus": 0.0}]
    assert ray.calls == [("init", {"num_cpus": 2, "include_dashboard": False,
                                   "log_to_driver": False}), ("shutdown", {})]
    run_sweep(path, tmp_path / "out2", backend="ray", cpus_per_run=2, gpus_per_run=0.5,
              command_prefix=fake_trainer, stream=io.StringIO())
    assert ray.resources[-1] == {"num_cpus": 2, "num_gpus": 0.5}


def test_a_bare_name_finds_a_shipped_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no quickstart.toml here
    assert load_spec("quickstart.toml").name == "quickstart"
    with pytest.raises(SweepError, match="name a shipped spec: .*quickstart.toml"):
        load_spec("quickstrat.toml")
    (tmp_path / "quickstart.toml").write_text('name = "mine"\ngin_files = ["dqn.gin"]\n')
    assert load_spec("quickstart.toml").name == "mine"  # a local file comes first


def test_spec_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(SweepError, match="not UTF-8"):
        load_spec(path)


def test_missing_command_is_a_sweep_error(gin_dir, tmp_path):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    with pytest.raises(SweepError, match="not found on PATH"):
        run_sweep(path, tmp_path / "out", command_prefix=("no-such-moerl-binary", "train"),
                  stream=io.StringIO())


@pytest.mark.parametrize("line, fragment", [
    ('games = ["NotAGame"]', "unknown Atari game 'NotAGame'"),
    ("seeds = [-1]", "seeds must be non-negative"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_game_or_seed_refused_up_front(gin_dir, fake_trainer, tmp_path, line, fragment,
                                           dry_run):
    path = write(gin_dir / "s.toml", f'name = "x"\ngin_files = ["a.gin"]\n{line}\n')
    stream = io.StringIO()
    with pytest.raises(SweepError, match=fragment):
        run_sweep(path, tmp_path / "out", dry_run=dry_run, command_prefix=fake_trainer,
                  stream=stream)
    assert stream.getvalue() == "" and not (tmp_path / "out").exists()


def test_gym_and_custom_game_bindings_are_not_checked_as_atari(gin_dir):
    for binding in ("create_gym_environment.environment_name", "Env.game"):
        path = write(gin_dir / "s.toml", f'name = "x"\ngin_files = ["a.gin"]\n'
                                         f'games = ["CartPole"]\ngame_binding = "{binding}"\n')
        assert [r.game for r in expand(load_spec(path))] == ["CartPole"]


def test_ungroupable_seeds_refused_before_anything_is_printed_or_written(
        gin_dir, fake_trainer, tmp_path):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0, 1]\n'
                                     'name_template = "s{seed}"\n')
    out = tmp_path / "out"
    for dry_run in (True, False):
        stream = io.StringIO()
        with pytest.raises(SweepError, match="needs run names ending in '/seed"):
            run_sweep(path, out, dry_run=dry_run, seeds_per_process=True,
                      command_prefix=fake_trainer, stream=stream)
        assert stream.getvalue() == "" and not out.exists()
    # An existing out dir is left untouched, even when every run in it is done.
    assert run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO()).ok
    before = snapshot(out)
    with pytest.raises(SweepError, match="needs run names ending in '/seed"):
        run_sweep(path, out, seeds_per_process=True, command_prefix=fake_trainer,
                  stream=io.StringIO())
    assert snapshot(out) == before


def test_seeds_only_spec_is_told_how_to_group(gin_dir, fake_trainer, tmp_path):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0, 1]\n')
    assert [r.name for r in expand(load_spec(path))] == ["seed0", "seed1"]
    with pytest.raises(SweepError, match="only seeds names its runs 'seed{seed}': set "
                                         "name_template, e.g. 'run/seed{seed}'"):
        run_sweep(path, tmp_path / "out", seeds_per_process=True,
                  command_prefix=fake_trainer, stream=io.StringIO())
    assert not (tmp_path / "out").exists()


def test_failed_seed_group_reports_the_groups_log(gin_dir, fake_trainer, tmp_path):
    # The fake trainer knows no --num_seeds: the group's process fails on it.
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0, 1]\n'
                                     'name_template = "g/seed{seed}"\n')
    out, stream = tmp_path / "out", io.StringIO()
    result = run_sweep(path, out, seeds_per_process=True, command_prefix=fake_trainer,
                       stream=stream)
    log = out / "g" / "sweep.log"
    assert "--num_seeds" in log.read_text()
    assert [o.name for o in result.failed] == ["g/seed0", "g/seed1"]
    for o in result.failed:
        assert o.log == str(log)
        assert o.reason.startswith("exit 2: ") and "unrecognized arguments" in o.reason
    assert stream.getvalue().rstrip().endswith(f"logs in {log}")


def test_dry_run_refuses_a_foreign_out_dir(gin_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\n')
    with pytest.raises(SweepError, match="not empty"):
        run_sweep(path, out, dry_run=True, stream=io.StringIO())
    assert snapshot(out) == {"notes.txt": (b"mine", (out / "notes.txt").stat().st_mtime_ns)}


def test_failed_manifest_write_leaves_no_partial_file(gin_dir, fake_trainer, tmp_path,
                                                      monkeypatch):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0]\n')
    out = tmp_path / "out"
    out.mkdir()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(SweepError, match="cannot write to out_dir"):
        run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    assert list(out.iterdir()) == []


def test_gin_file_search_order(gin_dir, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "a.gin").write_text("# cwd copy\n")
    (gin_dir / "dqn.gin").write_text("# spec-folder copy\n")
    monkeypatch.chdir(cwd)
    # moerl train: as given (the current directory), then the shipped configs.
    assert gin_config.resolve_gin_file("a.gin") == "a.gin"
    shipped = os.path.join(gin_config.packaged_config_dir(), "dqn.gin")
    assert gin_config.resolve_gin_file("dqn.gin") == shipped
    # moerl sweep: the spec's folder comes between the two.
    assert gin_config.resolve_gin_file("dqn.gin", str(gin_dir)) == str(gin_dir / "dqn.gin")
    spec = load_spec(write(gin_dir / "s.toml", 'name = "x"\n'
                           'gin_files = ["a.gin", "dqn.gin", "b.gin", "rainbow.gin"]\n'))
    assert spec.gin_files == (str(cwd / "a.gin"), str(gin_dir / "dqn.gin"),
                              str(gin_dir / "b.gin"),
                              os.path.realpath(os.path.join(gin_config.packaged_config_dir(),
                                                            "rainbow.gin")))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unreadable_status_means_unfinished(gin_dir, fake_trainer, tmp_path, text):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0]\n'
                                     'name_template = "r{seed}"\n')
    out = tmp_path / "out"
    assert run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO()).ok
    (out / "r0" / "status.json").write_text(text)
    with pytest.raises(RunDirError, match="status.json"):  # what `moerl train` sees
        RunDir(str(out / "r0")).read_status()
    result = run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    assert [o.name for o in result.done] == ["r0"] and len(invocations(out / "r0")) == 2


# --------------------------------------------------------------------------- execution

EXEC_SPEC = """
    name = "exec"
    gin_files = ["a.gin"]
    seeds = [0, 1]
    name_template = "{mode}/seed{seed}"
    game_binding = "Env.game"
    [grid]
    "Fake.mode" = ["ok", "bad", "fine"]
"""


def test_local_sweep_two_workers_failure_and_rerun(gin_dir, fake_trainer, tmp_path):
    path = write(gin_dir / "s.toml", EXEC_SPEC)
    out = tmp_path / "out"
    stream = io.StringIO()
    result = run_sweep(path, out, workers=2, command_prefix=fake_trainer, stream=stream)
    assert sorted(o.name for o in result.done) == [
        "fine/seed0", "fine/seed1", "ok/seed0", "ok/seed1"]
    assert [o.name for o in result.failed] == ["bad/seed0", "bad/seed1"]
    assert all("the binding is bad" in o.reason and "exit 1" in o.reason
               for o in result.failed)
    assert not result.skipped and not result.ok
    text = stream.getvalue()
    closing = text[text.index("run "):]
    assert "bad/seed0" in closing and "failed" in closing and "the binding is bad" in closing
    assert "4 done, 2 failed, 0 skipped, 6 total" in text
    assert f"logs in {out}/<run>/sweep.log" in text  # each failed run wrote its own
    # one progress line per finished run (stream is not a TTY)
    assert text.count("[") >= 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sweep"] == "exec" and len(manifest["runs"]) == 6
    assert manifest["runs"][0]["bindings"][-1] == "Runner.seed = 0"
    for name in ("ok/seed0", "bad/seed1"):
        log = (out / name / "sweep.log").read_text()
        assert "starting" in log and "--base_dir" in log
        assert len(invocations(out / name)) == 1

    # Rerun: finished runs are skipped, failed ones are retried.
    result2 = run_sweep(path, out, workers=2, command_prefix=fake_trainer,
                        stream=io.StringIO())
    assert sorted(o.name for o in result2.skipped) == [
        "fine/seed0", "fine/seed1", "ok/seed0", "ok/seed1"]
    assert [o.name for o in result2.failed] == ["bad/seed0", "bad/seed1"]
    assert len(invocations(out / "ok/seed0")) == 1
    assert len(invocations(out / "bad/seed0")) == 2


def test_changed_spec_with_same_name_is_refused(gin_dir, fake_trainer, tmp_path):
    path = write(gin_dir / "s.toml", 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0]\n'
                                     'name_template = "r{seed}"\n')
    out = tmp_path / "out"
    assert run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO()).ok
    # Adding a seed is fine and only runs the new one.
    write(path, 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0, 1]\nname_template = "r{seed}"\n')
    result = run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())
    assert [o.name for o in result.skipped] == ["r0"] and [o.name for o in result.done] == ["r1"]
    # Changing what run r0 means is refused.
    write(path, 'name = "x"\ngin_files = ["a.gin"]\nseeds = [0]\nname_template = "r{seed}"\n'
                'bindings = ["A.b = 1"]\n')
    with pytest.raises(SweepError, match="other gin files or bindings"):
        run_sweep(path, out, command_prefix=fake_trainer, stream=io.StringIO())


def test_ray_backend_runs_the_same_sweep(gin_dir, fake_trainer, tmp_path):
    ray = pytest.importorskip("ray")
    path = write(gin_dir / "s.toml", EXEC_SPEC)
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(path, out, backend="ray", workers=2, command_prefix=fake_trainer,
                           stream=io.StringIO())
    finally:
        ray.shutdown()
    assert sorted(o.name for o in result.done) == [
        "fine/seed0", "fine/seed1", "ok/seed0", "ok/seed1"]
    assert sorted(o.name for o in result.failed) == ["bad/seed0", "bad/seed1"]
    assert all("the binding is bad" in o.reason for o in result.failed)
    for name in ("ok/seed0", "fine/seed1"):
        assert json.loads((out / name / "status.json").read_text())["state"] == "done"
        assert (out / name / "sweep.log").stat().st_size > 0


def test_run_spec_command():
    run = sweeps.RunSpec("r", ("a.gin", "b.gin"), ("A.x = 1", "B.y = 'z'"), None, None, None, {})
    assert run.command("/o/r") == [
        "moerl", "train", "--base_dir", "/o/r", "--gin_files", "a.gin", "--gin_files", "b.gin",
        "--gin_bindings", "A.x = 1", "--gin_bindings", "B.y = 'z'"]
