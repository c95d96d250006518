"""Sweeps: expand a TOML grid into ``moerl train`` runs and execute them locally or on Ray.

Sweep spec (TOML)
-----------------
::

    name = "softmoe_scaling"                  # required; identifies the sweep in manifest.json
    gin_files = ["dqn_softmoe.gin"]           # required unless every [[variants]] sets its own
    bindings = ["Runner.num_iterations = 2"]  # optional fixed bindings for every run
    games = ["Pong", "Breakout"]              # optional; each bound via `game_binding`
    seeds = [0, 1, 2]                         # optional; each bound via `seed_binding`
    game_binding = "create_atari_environment.game_name"   # optional (this is the default)
    seed_binding = "Runner.seed"                          # optional (this is the default)
    variant_binding = "Runner.variant"        # optional; binds each variant's name (no default)
    name_template = "{game}/{variant}/{num_experts}/seed{seed}"   # optional

    [grid]                                    # cartesian product; keys are gin binding targets
    "SoftMoE.num_experts" = [1, 2, 4, 8]

    [[zip]]                                   # axes that move together (equal-length lists);
    "SoftMoE.num_experts" = [1, 2, 4, 8]      # several [[zip]] tables multiply with each other
    "SoftMoE.expert_hidden_units" = [512, 256, 128, 64]   # and with [grid]

    [[variants]]                              # optional named alternatives
    name = "dense"                            # required, unique
    gin_files = ["dqn.gin"]                   # optional: REPLACES the top-level gin_files
    bindings = ["DensePenultimate.width_scale = 2"]  # optional: APPENDED to top-level bindings
    [variants.grid]                           # optional: axes only this variant sweeps,
    "DensePenultimate.width_scale" = [1, 2, 4]   # multiplied with the top-level axes
    # [[variants.zip]] works the same way

Number of runs = product(grid lengths) x product(zip lengths) x games x seeds, summed over
variants (each with its own extra axes). A key may appear in only one axis table. Seeds
must be non-negative integers. Games bound through the default ``game_binding`` are checked
against ale-py's Atari games (``environments.atari_game_name``) when the spec is loaded, and
games bound through ``create_gym_environment.environment_name`` against gymnasium's registry
(``environments.check_gym_environment_name``); those of other bindings are checked when their
run starts (the first one also by ``check_configs``).

Gin files are looked up, in order, as: an absolute path; a path relative to the current
directory; relative to the spec file's directory; a name in the packaged ``configs/`` dir
(``gin_config.resolve_gin_file`` with the spec's directory as its extra folder).
They are resolved to absolute paths when the spec is loaded (missing file -> SweepError).

Axis values become gin literals: strings are quoted (``'Pong'``) except those starting with
``@`` or ``%``, which are passed through as gin references / macros (``@NatureCNN``); booleans
become ``True``/``False``; numbers are written as is; arrays become gin lists and inline
tables gin dicts.

Run names come from ``name_template`` (Python ``str.format``) with the fields ``{game}``,
``{seed}``, ``{variant}`` and each axis value by its short name (the part after the last
``.``, e.g. ``{num_experts}``) when that short name is unique. The default template is
``{game}/{variant}/<axis>=<value>,.../seed{seed}`` using only the parts the spec has. Names
may contain ``/`` (nested directories); other unsafe characters become ``_``; names must be
unique.

Output directory
----------------
``out_dir/manifest.json`` records ``{"sweep", "spec_path", "created", "updated", "runs"}``
where each run is ``RunSpec.to_dict()``. Each run's ``--base_dir`` is ``out_dir/<name>``; its
subprocess stdout+stderr are appended to ``out_dir/<name>/sweep.log`` (a seed group's, see
``group_seeds``, to its group's directory, the run name without ``/seed<k>``). A run is skipped when
its ``status.json`` says ``"done"``; any other run is (re)started, and ``moerl train`` resumes
from its checkpoint. ``run_sweep`` refuses an ``out_dir`` whose manifest belongs to a
different sweep (another ``name``, or a run of the same name with other gin files or
bindings), and a non-empty ``out_dir`` without a manifest. These checks and those of the spec,
bindings, options and ``--seeds_per_process`` grouping run before anything is written, in
a dry run too. ``moerl sweep`` then builds each distinct config once (games and seeds aside;
``check_configs``), so that a bad value, a game or seed binding the config does not use, or
two runs that would train the same config (an axis on a layer the config does not build,
variants that differ only in name) is refused before any run starts. Adding seeds or axis
values to a sweep and rerunning into the same ``out_dir`` is allowed and runs only the new
runs. A changed ``Runner.num_iterations`` binding keeps the sweep the same (as for ``moerl
train``): its done runs are run again, and ``moerl train`` extends each from its last
checkpoint. A lower one is refused up front (``check_num_iterations``), as ``moerl train``
would refuse each run, when a run to be (re)started already holds more finished iterations
than its new ``Runner.num_iterations``.

Backends
--------
``local``: ``workers`` concurrent subprocesses. ``ray``: one Ray task per run
(``num_cpus=cpus_per_run, num_gpus=gpus_per_run``, by default 1 CPU and no GPU) that runs the
same subprocess on whichever node Ray picks. ``ray_address``, ``cpus_per_run`` and
``gpus_per_run`` apply to the ray backend only and are refused with the local one (None
means not given). With ``ray_address`` set, ``out_dir`` and the gin files
must be on a filesystem shared by all Ray nodes, and ``moerl`` must be installed on every
node.

``ray_address`` is ``'auto'`` or ``'local'`` (Ray finds or starts the cluster on this
machine), ``HOST:PORT`` (a cluster's GCS, e.g. ``head:6379``), ``ray://HOST:PORT`` (a Ray
client server, e.g. ``ray://head:10001``) or another ``scheme://`` address Ray takes
(passed on unchecked); other addresses are refused. For ``HOST:PORT`` and
``ray://HOST:PORT``, a sweep with runs to start checks, before anything is written (in a
dry run too), that a TCP connection to HOST:PORT succeeds within ``RAY_CONNECT_TIMEOUT_S``
seconds and that the server answers HTTP/2, as Ray's gRPC servers do: Ray itself would
retry an unreachable address, or one that is not Ray's, for ever. Ray is started or joined
before the manifest is written, so a failing ``ray.init`` writes nothing either.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

from experiments.run_dir import (CHECKPOINT_DIR, CONFIG_FILE, NUM_ITERATIONS_RE, SWEEP_LOG,
                                 RunDirError, atomic_write_json, finished_checkpoints)
from experiments.run_dir import read_status as read_run_status
from networks.checks import is_int


class SweepError(ValueError):
    """Bad sweep input; the message is one sentence naming the problem and the fix."""


DEFAULT_GAME_BINDING = "create_atari_environment.game_name"
DEFAULT_SEED_BINDING = "Runner.seed"

_TOP_KEYS = {"name", "gin_files", "bindings", "games", "seeds", "game_binding", "seed_binding",
             "variant_binding", "name_template", "grid", "zip", "variants"}
_VARIANT_KEYS = {"name", "gin_files", "bindings", "grid", "zip"}
_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._=,+-]")


# --------------------------------------------------------------------------- data classes


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named alternative inside a sweep (own gin files, extra bindings, extra axes)."""

    name: str
    gin_files: tuple[str, ...] | None = None
    bindings: tuple[str, ...] = ()
    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    zips: tuple[dict[str, list], ...] = ()


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated sweep spec (see the module docstring for the TOML format)."""

    name: str
    path: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...] = ()
    games: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    game_binding: str = DEFAULT_GAME_BINDING
    seed_binding: str = DEFAULT_SEED_BINDING
    variant_binding: str | None = None
    name_template: str | None = None
    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    zips: tuple[dict[str, list], ...] = ()
    variants: tuple[Variant, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One expanded run: a ``moerl train`` invocation."""

    name: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    game: str | None
    seed: int | None
    variant: str | None
    axes: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "gin_files": list(self.gin_files),
                "bindings": list(self.bindings), "game": self.game, "seed": self.seed,
                "variant": self.variant, "axes": dict(self.axes)}

    def command(self, base_dir: str | os.PathLike,
                command_prefix: Sequence[str] = ("moerl", "train")) -> list[str]:
        cmd = [*command_prefix, "--base_dir", str(base_dir)]
        for f in self.gin_files:
            cmd += ["--gin_files", f]
        for b in self.bindings:
            cmd += ["--gin_bindings", b]
        return cmd


@dataclasses.dataclass(frozen=True)
class Job:
    """One subprocess: a single run, or consecutive seeds of one run trained
    together by ``moerl train --num_seeds`` (``members`` are the runs it writes)."""

    run: RunSpec  # what to launch; its name is the job's --base_dir
    members: tuple[RunSpec, ...]
    extra_args: tuple[str, ...] = ()

    def command(self, out: Path, command_prefix: Sequence[str]) -> list[str]:
        return [*self.run.command(out / self.run.name, command_prefix), *self.extra_args]


def group_seeds(spec: "SweepSpec", runs: Sequence[RunSpec]) -> list[Job]:
    """Jobs that train consecutive seeds of otherwise identical runs in one process.

    Needs run names ending in ``/seed{seed}`` (the default template does, unless the spec
    has only seeds: then runs are named ``seed{seed}``) and the
    seed bound through ``Runner.seed``: ``moerl train --num_seeds S`` writes seed k to
    ``<base_dir>/seed<k>``, exactly where the lone run would have gone. Raises
    SweepError when a run cannot be grouped so.
    """
    if spec.seed_binding != DEFAULT_SEED_BINDING:
        raise SweepError(f"--seeds_per_process needs seeds bound through "
                         f"{DEFAULT_SEED_BINDING!r}, not {spec.seed_binding!r}; drop the flag")
    groups: dict[tuple, list[RunSpec]] = {}
    for r in runs:
        head, _, tail = r.name.rpartition("/")
        if r.seed is None or not head or tail != f"seed{r.seed}":
            hint = ("; a spec with only seeds names its runs 'seed{seed}': set name_template,"
                    " e.g. 'run/seed{seed}', or drop the flag" if not head else
                    "; fix name_template or drop the flag")
            raise SweepError(f"--seeds_per_process needs run names ending in '/seed{{seed}}', "
                             f"got {r.name!r}{hint}")
        own = f"{spec.seed_binding} = {r.seed}"
        key = (head, r.gin_files, tuple(b for b in r.bindings if b != own))
        groups.setdefault(key, []).append(r)
    jobs = []
    for (head, _, rest), members in groups.items():
        members.sort(key=lambda m: m.seed)
        block = [members[0]]
        for m in members[1:] + [None]:
            if m is not None and m.seed == block[-1].seed + 1:
                block.append(m)
                continue
            if len(block) == 1:
                jobs.append(Job(block[0], (block[0],)))
            else:
                first = block[0]
                launcher = dataclasses.replace(
                    first, name=head,
                    bindings=(*rest, f"{spec.seed_binding} = {first.seed}"))
                jobs.append(Job(launcher, tuple(block), ("--num_seeds", str(len(block)))))
            block = [m]
    return jobs


@dataclasses.dataclass
class RunOutcome:
    """What happened to one run: state is 'done', 'failed' or 'skipped'."""

    name: str
    state: str
    seconds: float = 0.0
    reason: str | None = None
    returncode: int | None = None
    base_dir: str = ""
    log: str = ""  # the sweep.log its process wrote (a seed group's is shared)

    def __str__(self) -> str:
        return self.name if not self.reason else f"{self.name}: {self.reason}"


@dataclasses.dataclass
class SweepResult:
    """Outcome of ``run_sweep``; ``failed`` non-empty means the sweep failed (exit 1)."""

    out_dir: str
    runs: list[RunSpec]
    done: list[RunOutcome] = dataclasses.field(default_factory=list)
    failed: list[RunOutcome] = dataclasses.field(default_factory=list)
    skipped: list[RunOutcome] = dataclasses.field(default_factory=list)
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed


# --------------------------------------------------------------------------- loading


def _where(path: str) -> str:
    return f"sweep file {path}"


def _str_list(value: Any, key: str, path: str, *, allow_empty: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{_where(path)}: '{key}' must be a list of strings; write it as "
                         f"{key} = [\"...\"]")
    if not allow_empty and not value:
        raise SweepError(f"{_where(path)}: '{key}' is an empty list, which gives zero runs; "
                         f"give it at least one value or remove it")
    return tuple(value)


def _check_axis_table(table: Any, where: str, path: str) -> dict[str, list]:
    if not isinstance(table, dict):
        raise SweepError(f"{_where(path)}: {where} must be a table of "
                         f"\"Configurable.param\" = [values]; fix its syntax")
    out: dict[str, list] = {}
    for key, values in table.items():
        if not _TARGET_RE.match(key) or "." not in key:
            raise SweepError(f"{_where(path)}: axis {key!r} in {where} is not a gin binding "
                             f"target; write it as \"Configurable.parameter\"")
        if not isinstance(values, list):
            raise SweepError(f"{_where(path)}: axis {key!r} in {where} must be a list of "
                             f"values; write it as {key!r} = [{values!r}]")
        if not values:
            raise SweepError(f"{_where(path)}: axis {key!r} in {where} is an empty list, "
                             f"which gives zero runs; give it at least one value")
        for v in values:
            gin_literal(v, context=f"{_where(path)}: axis {key!r}")
        out[key] = list(values)
    return out


def _check_zips(value: Any, where: str, path: str) -> tuple[dict[str, list], ...]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise SweepError(f"{_where(path)}: {where} must be written as one or more [[zip]] "
                         f"tables; fix its syntax")
    zips = []
    for i, table in enumerate(value):
        axes = _check_axis_table(table, f"{where} #{i + 1}", path)
        if not axes:
            raise SweepError(f"{_where(path)}: {where} #{i + 1} is empty; add axes to it or "
                             f"remove it")
        lengths = {k: len(v) for k, v in axes.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k!r} has {n}" for k, n in lengths.items())
            raise SweepError(f"{_where(path)}: the lists in {where} #{i + 1} have unequal "
                             f"lengths ({detail}); give every zipped axis the same number "
                             f"of values")
        zips.append(axes)
    return tuple(zips)


def _resolve_gin_file(name: str, spec_dir: Path, path: str) -> str:
    """``gin_config.resolve_gin_file`` that also looks in the spec's folder; absolute."""
    from experiments import gin_config  # registers every configurable: slow, so lazy
    try:
        return str(Path(gin_config.resolve_gin_file(name, str(spec_dir))).resolve())
    except gin_config.GinConfigError as e:
        raise SweepError(f"{_where(path)}: {e}") from None


def _check_seeds(raw: Any, path: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(map(is_int, raw)):
        raise SweepError(f"{_where(path)}: 'seeds' must be a list of integers; write it as "
                         f"seeds = [0, 1, 2]")
    if not raw:
        raise SweepError(f"{_where(path)}: 'seeds' is an empty list, which gives zero runs; "
                         f"give at least one seed or remove the key")
    if min(raw) < 0:
        raise SweepError(f"{_where(path)}: 'seeds' holds {min(raw)}, but seeds must be "
                         f"non-negative; use seeds such as [0, 1, 2]")
    if len(set(raw)) != len(raw):
        raise SweepError(f"{_where(path)}: 'seeds' has duplicates; list each seed once")
    return tuple(raw)


GYM_GAME_BINDING = "create_gym_environment.environment_name"


def _check_games(games: tuple[str, ...] | None, game_binding: str, path: str) -> None:
    """Refuses unknown games, which their runs would otherwise fail on.

    Games bound through ``create_atari_environment`` are checked against ale-py's games,
    those bound through ``create_gym_environment`` against gymnasium's registry; games of
    a custom binding fail in their run.
    """
    target = None if games is None else game_binding.rpartition("/")[2]
    if target not in (DEFAULT_GAME_BINDING, GYM_GAME_BINDING):
        return
    from experiments import environments  # imports ale-py: lazy
    check = (environments.atari_game_name if target == DEFAULT_GAME_BINDING
             else environments.check_gym_environment_name)
    for game in games:
        try:
            check(game)
        except ValueError as e:
            raise SweepError(f"{_where(path)}: {e}; fix 'games'") from None


def _axis_keys(grid: dict, zips: Iterable[dict]) -> list[str]:
    keys = list(grid)
    for z in zips:
        keys += list(z)
    return keys


def shipped_specs() -> dict[str, str]:
    """File name -> path of the specs moerl ships (``configs/sweeps/*.toml``)."""
    import importlib.resources  # pylint: disable=g-import-not-at-top
    folder = importlib.resources.files("configs") / "sweeps"
    return {f.name: str(f) for f in folder.iterdir() if f.name.endswith(".toml")}


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep spec TOML file; raise SweepError on bad input.

    A bare file name that is not in the working directory names a shipped spec
    (``quickstart.toml``), as ``--gin_files`` names shipped configs."""
    path = str(path)
    bare = os.path.basename(path) == path
    if bare and not os.path.exists(path):
        path = shipped_specs().get(path, path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        hint = "check the path"
        if bare:
            hint += f", or name a shipped spec: {', '.join(sorted(shipped_specs()))}"
        raise SweepError(f"sweep file {path} does not exist; {hint}") from None
    except IsADirectoryError:
        raise SweepError(f"sweep file {path} is a directory; pass a .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{_where(path)} is not valid TOML ({e}); fix the syntax at that "
                         f"line") from None
    except UnicodeDecodeError:
        raise SweepError(f"{_where(path)} is not UTF-8 text; save the spec as UTF-8 "
                         f"TOML") from None
    except OSError as e:
        raise SweepError(f"cannot read sweep file {path} ({e.strerror}); check the path and "
                         f"its permissions") from None

    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise SweepError(f"{_where(path)}: unknown top-level key(s) {', '.join(unknown)}; "
                         f"allowed keys are {', '.join(sorted(_TOP_KEYS))}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SweepError(f"{_where(path)}: 'name' is missing or empty; add name = \"...\" at "
                         f"the top of the file")
    spec_dir = Path(path).resolve().parent

    def resolve_files(files: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_resolve_gin_file(f, spec_dir, path) for f in files)

    gin_files = resolve_files(_str_list(data.get("gin_files", []), "gin_files", path))
    bindings = _str_list(data.get("bindings", []), "bindings", path)
    games = None
    if "games" in data:
        games = _str_list(data["games"], "games", path, allow_empty=False)
    seeds = _check_seeds(data["seeds"], path) if "seeds" in data else None
    if games is not None and len(set(games)) != len(games):
        raise SweepError(f"{_where(path)}: 'games' has duplicates; list each game once")

    targets = {}
    for key in ("game_binding", "seed_binding", "variant_binding"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not _TARGET_RE.match(value)):
            raise SweepError(f"{_where(path)}: '{key}' must be a gin binding target such as "
                             f"\"Runner.seed\"; fix its value")
        targets[key] = value
    _check_games(games, targets["game_binding"] or DEFAULT_GAME_BINDING, path)
    template = data.get("name_template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise SweepError(f"{_where(path)}: 'name_template' must be a non-empty string such as "
                         f"\"{{game}}/{{variant}}/seed{{seed}}\"; fix its value")

    grid = _check_axis_table(data.get("grid", {}), "[grid]", path)
    if "grid" in data and not grid:
        raise SweepError(f"{_where(path)}: [grid] is empty; add axes to it or remove it")
    zips = _check_zips(data.get("zip", []), "[[zip]]", path)

    variants = []
    raw_variants = data.get("variants", [])
    if not isinstance(raw_variants, list):
        raise SweepError(f"{_where(path)}: 'variants' must be written as [[variants]] tables; "
                         f"fix its syntax")
    seen = set()
    for i, v in enumerate(raw_variants):
        if not isinstance(v, dict):
            raise SweepError(f"{_where(path)}: [[variants]] #{i + 1} is not a table; write it "
                             f"as [[variants]] with name = \"...\"")
        bad = sorted(set(v) - _VARIANT_KEYS)
        if bad:
            raise SweepError(f"{_where(path)}: unknown key(s) {', '.join(bad)} in [[variants]] "
                             f"#{i + 1}; allowed keys are {', '.join(sorted(_VARIANT_KEYS))}")
        vname = v.get("name")
        if not isinstance(vname, str) or not vname.strip():
            raise SweepError(f"{_where(path)}: [[variants]] #{i + 1} has no name; add "
                             f"name = \"...\" to it")
        if vname in seen:
            raise SweepError(f"{_where(path)}: variant name {vname!r} is used twice; give each "
                             f"variant a unique name")
        seen.add(vname)
        vfiles = None
        if "gin_files" in v:
            vfiles = resolve_files(_str_list(v["gin_files"], f"variants.{vname}.gin_files",
                                             path, allow_empty=False))
        if not (vfiles or gin_files):
            raise SweepError(f"{_where(path)}: variant {vname!r} has no gin files; add "
                             f"gin_files to it or at the top level")
        vgrid = _check_axis_table(v.get("grid", {}), f"[variants.grid] of {vname!r}", path)
        vzips = _check_zips(v.get("zip", []), f"[[variants.zip]] of {vname!r}", path)
        variants.append(Variant(vname, vfiles, _str_list(v.get("bindings", []),
                                                           f"variants.{vname}.bindings", path),
                                vgrid, vzips))
    if not variants and not gin_files:
        raise SweepError(f"{_where(path)}: no gin files given; add gin_files = [\"...\"]")

    for vt in variants or [Variant("")]:
        keys = _axis_keys(grid, zips) + _axis_keys(vt.grid, vt.zips)
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            where = f" (variant {vt.name!r})" if vt.name else ""
            raise SweepError(f"{_where(path)}: axis {dup[0]!r} appears in more than one axis "
                             f"table{where}; keep each axis in exactly one [grid] or [[zip]]")

    return SweepSpec(
        name=name, path=str(Path(path).resolve()), gin_files=gin_files, bindings=bindings,
        games=games, seeds=seeds,
        game_binding=targets["game_binding"] or DEFAULT_GAME_BINDING,
        seed_binding=targets["seed_binding"] or DEFAULT_SEED_BINDING,
        variant_binding=targets["variant_binding"], name_template=template,
        grid=grid, zips=zips, variants=tuple(variants))


# --------------------------------------------------------------------------- expansion


def gin_literal(value: Any, *, context: str = "value") -> str:
    """Format a TOML value as a gin literal (see the module docstring)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SweepError(f"{context}: {value!r} is not a finite number; use a finite value")
        return repr(value)
    if isinstance(value, str):
        if value[:1] in ("@", "%"):
            return value
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(gin_literal(v, context=context) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {gin_literal(v, context=context)}"
                               for k, v in value.items()) + "}"
    raise SweepError(f"{context}: values of type {type(value).__name__} cannot be gin "
                     f"bindings; use strings, numbers, booleans, arrays or tables")


def _value_for_name(value: Any) -> str:
    if isinstance(value, str):
        return value.lstrip("@%")
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _safe_name(raw: str, template_hint: str) -> str:
    parts = []
    for part in raw.strip().split("/"):
        part = _UNSAFE_RE.sub("_", part.strip())
        if not part:
            continue
        if part in (".", ".."):
            part = part.replace(".", "_")
        parts.append(part)
    if not parts:
        raise SweepError(f"name_template {template_hint!r} produced an empty run name; "
                         f"include fields such as {{game}} or {{seed}}")
    return "/".join(parts)


def _axis_combinations(grid: dict[str, list], zips: Sequence[dict[str, list]]):
    """Yield dicts {axis: value} for grid x zip_1 x zip_2 x ..."""
    factors: list[list[dict[str, Any]]] = []
    for key, values in grid.items():
        factors.append([{key: v} for v in values])
    for z in zips:
        n = len(next(iter(z.values())))
        factors.append([{k: z[k][i] for k in z} for i in range(n)])
    for combo in itertools.product(*factors):
        merged: dict[str, Any] = {}
        for part in combo:
            merged.update(part)
        yield merged


def _short_names(keys: Iterable[str]) -> dict[str, str]:
    keys = list(dict.fromkeys(keys))
    shorts = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s for k, s in zip(keys, shorts) if shorts.count(s) == 1}


def expand(spec: SweepSpec, *,
           validate_binding: Callable[[str], None] | None = None) -> list[RunSpec]:
    """Expand a spec into runs (variants x axes x games x seeds, in that nesting order).

    ``validate_binding`` (optional) is called once on every distinct binding string and
    raises ValueError for an unknown gin parameter; that becomes a SweepError.
    """
    variants = spec.variants or (None,)
    runs: list[RunSpec] = []
    for variant in variants:
        grid = dict(spec.grid)
        zips = list(spec.zips)
        files = spec.gin_files
        extra: tuple[str, ...] = ()
        if variant is not None:
            grid.update(variant.grid)
            zips += list(variant.zips)
            files = variant.gin_files or spec.gin_files
            extra = variant.bindings
            if spec.variant_binding:
                extra = (f"{spec.variant_binding} = {gin_literal(variant.name)}",) + extra
        for axes in _axis_combinations(grid, zips):
            for game in spec.games or (None,):
                for seed in spec.seeds or (None,):
                    bindings = list(spec.bindings) + list(extra)
                    bindings += [f"{k} = {gin_literal(v)}" for k, v in axes.items()]
                    if game is not None:
                        bindings.append(f"{spec.game_binding} = {gin_literal(game)}")
                    if seed is not None:
                        bindings.append(f"{spec.seed_binding} = {seed}")
                    runs.append(RunSpec(name="", gin_files=tuple(files),
                                        bindings=tuple(bindings), game=game, seed=seed,
                                        variant=variant.name if variant else None,
                                        axes=dict(axes)))
    if not runs:
        raise SweepError(f"sweep {spec.name!r} expands to zero runs; give every axis, game "
                         f"and seed list at least one value")
    runs = _name_runs(spec, runs)
    if validate_binding is not None:
        _validate_bindings(spec, runs, validate_binding)
    return runs


def _name_runs(spec: SweepSpec, runs: list[RunSpec]) -> list[RunSpec]:
    all_axes = list(dict.fromkeys(k for r in runs for k in r.axes))
    shorts = _short_names(all_axes)
    template = spec.name_template
    if template is None:
        parts = []
        if spec.games is not None:
            parts.append("{game}")
        if spec.variants:
            parts.append("{variant}")
        parts.append("{__axes__}")
        if spec.seeds is not None:
            parts.append("seed{seed}")
        template = "/".join(parts)
    named = []
    where: dict[str, RunSpec] = {}
    for r in runs:
        fields: dict[str, Any] = {}
        if r.game is not None:
            fields["game"] = r.game
        if r.seed is not None:
            fields["seed"] = r.seed
        if r.variant is not None:
            fields["variant"] = r.variant
        for k, v in r.axes.items():
            if k in shorts:
                fields[shorts[k]] = _value_for_name(v)
        fields["__axes__"] = ",".join(f"{shorts.get(k, k)}={_value_for_name(v)}"
                                      for k, v in r.axes.items())
        try:
            raw = template.format(**fields)
        except KeyError as e:
            avail = ", ".join("{" + f + "}" for f in fields if f != "__axes__")
            raise SweepError(f"{_where(spec.path)}: name_template uses unknown field {{{e.args[0]}}}"
                             f"; use only the available fields: {avail}") from None
        except (ValueError, IndexError, AttributeError, OverflowError, MemoryError) as e:
            raise SweepError(f"{_where(spec.path)}: name_template {template!r} is not a valid "
                             f"format string ({str(e) or 'a field width too large'}); use fields "
                             f"like {{game}} and {{seed}}") from None
        if spec.name_template is None and not raw.strip("/"):
            raw = "run"  # a single run with nothing that varies
        name = _safe_name(raw, template)
        if any(len(part.encode()) > 255 for part in name.split("/")):
            raise SweepError(f"{_where(spec.path)}: name_template {template!r} makes a run "
                             f"name with a part longer than 255 bytes, which no filesystem "
                             f"takes; shorten the template")
        if name in where:
            raise SweepError(f"{_where(spec.path)}: run name {name!r} is produced by more than "
                             f"one run; add the varying fields (e.g. {{seed}} or an axis short "
                             f"name) to name_template")
        nr = dataclasses.replace(r, name=name)
        where[name] = nr
        named.append(nr)
    # A name that is a directory prefix of another would nest one run inside another.
    names = sorted(where)
    for a, b in zip(names, names[1:]):
        if b.startswith(a + "/"):
            raise SweepError(f"{_where(spec.path)}: run name {a!r} is a parent directory of "
                             f"{b!r}; make the name_template give every run its own leaf "
                             f"directory")
    return named


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _game_seed_bindings(spec: SweepSpec, r: RunSpec) -> set[str]:
    """The bindings ``expand`` added for a run's game and seed."""
    added = set()
    if r.game is not None:
        added.add(f"{spec.game_binding} = {gin_literal(r.game)}")
    if r.seed is not None:
        added.add(f"{spec.seed_binding} = {r.seed}")
    return added


EffectiveConfigs = Callable[[list[tuple[tuple[str, ...], tuple[str, ...]]]],
                            Iterator[tuple[str, list[str]]]]


def _same_config_error(spec: SweepSpec, first: RunSpec, r: RunSpec, why: str) -> SweepError:
    return SweepError(f"{_where(spec.path)}: runs {first.name!r} and {r.name!r} would train "
                      f"the same config: {why}")


def check_configs(spec: SweepSpec, runs: Sequence[RunSpec], effective_configs: EffectiveConfigs,
                  stream: TextIO | None = None) -> None:
    """Builds each distinct config of the sweep once and refuses bad values and duplicates.

    Runs that differ only in game and seed share a config; the first run of each config
    (every config starts with the same game and seed, by ``expand``'s nesting) is passed,
    as ``(gin_files, bindings)``, to ``effective_configs``, which yields, config by config,
    the parameters the built config used (gin's operative config, labels such as
    ``Runner.variant`` aside) and the bindings it does not use, or raises ValueError for
    a bad value. Refused (SweepError): a bad value; a game or seed binding the config does
    not use (every game or seed would train the same run); two configs with the same
    operative config, which would train identical runs (for example an axis on a layer
    the config does not build, or two variants that differ only in their names). On a
    terminal, ``stream`` shows which config is being built (a line that is cleared again,
    so that a refusal stays one line).
    """
    firsts: dict[tuple, RunSpec] = {}
    for r in runs:
        own = _game_seed_bindings(spec, r)
        key = (r.gin_files, tuple(b for b in r.bindings if b not in own))
        first = firsts.setdefault(key, r)
        if first.variant != r.variant:
            raise _same_config_error(spec, first, r, f"variants {first.variant!r} and "
                                     f"{r.variant!r} have the same gin files and bindings; "
                                     f"make them differ, or drop one")
    isatty = getattr(stream, "isatty", None)
    shown = stream if isatty is not None and isatty() else None
    seen: dict[str, RunSpec] = {}
    built = iter(effective_configs([(r.gin_files, r.bindings) for r in firsts.values()]))
    try:
        for i, r in enumerate(firsts.values(), 1):
            if shown is not None:
                print(f"\r\033[Ksweep {spec.name!r}: building config {i}/{len(firsts)} "
                      f"({r.name})", end="", file=shown, flush=True)
            try:
                config, unused = next(built)
            except ValueError as e:
                raise SweepError(f"{_where(spec.path)}: run {r.name!r}: "
                                 f"{_first_line(e)}") from None
            finally:
                if shown is not None:
                    print("\r\033[K", end="", file=shown, flush=True)
            ignored = sorted(_game_seed_bindings(spec, r) & set(unused))
            if ignored:
                b = ignored[0]
                kind = "game" if b.startswith(spec.game_binding) else "seed"
                raise SweepError(f"{_where(spec.path)}: run {r.name!r} does not use its "
                                 f"{kind} binding {b!r}, so every {kind} would train the "
                                 f"same run; set {kind}_binding to the parameter that "
                                 f"chooses the {kind} in this config")
            first = seen.setdefault(config, r)
            if first is not r:
                differ = sorted({b.split("=", 1)[0].strip()
                                 for b in set(first.bindings) ^ set(r.bindings)}
                                - {spec.variant_binding})
                if first.gin_files != r.gin_files:
                    differ.append("gin_files")
                if not differ:
                    raise _same_config_error(spec, first, r, f"variants {first.variant!r} "
                                             f"and {r.variant!r} differ only in name; make "
                                             f"them differ, or drop one")
                raise _same_config_error(spec, first, r, f"they differ only in "
                                         f"{', '.join(differ)}, which change"
                                         f"{'s' if len(differ) == 1 else ''} nothing in "
                                         f"the built config (a parameter it does not use, "
                                         f"or a value it already has); bind it only where "
                                         f"it takes effect, or drop it")
    finally:  # a generator stops its builder (e.g. a child process) here
        getattr(built, "close", lambda: None)()


def _validate_bindings(spec: SweepSpec, runs: list[RunSpec],
                       validate_binding: Callable[[str], None]) -> None:
    axis_keys = {k for r in runs for k in r.axes}
    for b in dict.fromkeys(b for r in runs for b in r.bindings):
        try:
            validate_binding(b)
        except ValueError as e:
            target = b.split("=", 1)[0].strip()
            kind = "axis" if target in axis_keys else "binding"
            raise SweepError(f"{_where(spec.path)}: bad {kind} {target!r}: {_first_line(e)}; "
                             f"fix its parameter name or value") from None


# --------------------------------------------------------------------------- execution


def _read_status(run_dir: Path) -> dict:
    """A run's ``status.json``, or {} when it has none or it cannot be read (such a run
    counts as unfinished and is restarted, which rewrites the file)."""
    try:
        return read_run_status(run_dir) or {}
    except RunDirError:
        return {}


def _last_log_line(log_path: Path) -> str | None:
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        if line.strip() and not line.startswith("=== sweep"):
            return line.strip()
    return None


def _failure_reason(run_dir: Path, log: Path, returncode: int | None,
                    error: str | None) -> str:
    if error:
        return error
    status = _read_status(run_dir)
    last = _last_log_line(log)
    if last:
        reason = last
    elif status.get("error"):
        reason = str(status["error"]).strip().splitlines()[-1]
    elif status.get("state") not in (None, "done"):
        reason = f"status.json says {status.get('state')!r}"
    else:
        reason = "no output"
    if returncode is None:
        return reason
    code = (f"killed by signal {-returncode}" if returncode < 0 else f"exit {returncode}")
    return f"{code}: {reason}"


def _execute(cmd: list[str], run_dir: str, procs: set | None = None,
             lock: threading.Lock | None = None) -> tuple[int | None, float, str | None]:
    """Run one command with output appended to run_dir/sweep.log.

    Returns (returncode, seconds, error); error is set when the command could not start.
    Also the Ray backend's task: Ray imports this module on the node that runs it (moerl is
    installed on every node).
    """
    start = time.monotonic()
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(os.path.join(run_dir, SWEEP_LOG), "ab") as log:
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        log.write(f"=== sweep {stamp}: {shlex.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            return None, time.monotonic() - start, f"cannot start {cmd[0]!r}: {e.strerror}"
        if procs is not None and lock is not None:
            with lock:
                procs.add(proc)
        try:
            rc = proc.wait()
        finally:
            if procs is not None and lock is not None:
                with lock:
                    procs.discard(proc)
    return rc, time.monotonic() - start, None


class _Progress:
    """A tqdm bar on a TTY; otherwise one line per finished run."""

    def __init__(self, total: int, skipped: int, stream: TextIO):
        self.total, self.stream = total, stream
        self.counts = {"done": 0, "failed": 0, "skipped": skipped}
        self.start = time.monotonic()
        self.bar = None
        isatty = getattr(stream, "isatty", None)
        if isatty is not None and isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=skipped, file=stream, unit="run",
                                dynamic_ncols=True)
                self.bar.set_postfix(self.counts)
            except ImportError:
                self.bar = None

    def finished(self, outcome: RunOutcome) -> None:
        self.counts[outcome.state] += 1
        elapsed = _fmt_seconds(time.monotonic() - self.start)
        n = sum(self.counts.values())
        line = (f"[{n}/{self.total}] {outcome.state:<6} {outcome.name} "
                f"({outcome.seconds:.1f}s)"
                + (f": {outcome.reason}" if outcome.reason else "")
                + f" | done {self.counts['done']}, failed {self.counts['failed']}, "
                  f"skipped {self.counts['skipped']}, total {self.total}, elapsed {elapsed}")
        if self.bar is not None:
            self.bar.set_postfix(self.counts)
            self.bar.update(1)
            if outcome.state == "failed":
                self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    widths[-1] = 0  # last column unpadded
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * max(w, len(h)) for h, w in zip(headers, widths)))
    for row in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _print_plan(spec: SweepSpec, runs: list[RunSpec], states: dict[str, str | None],
                out_dir: Path, stream: TextIO) -> None:
    common = [b for b in runs[0].bindings if all(b in r.bindings for r in runs)]
    print(f"sweep {spec.name!r}: {len(runs)} run(s) into {out_dir} (dry run: nothing is "
          f"run or written)", file=stream)
    files = sorted({f for r in runs for f in r.gin_files})
    print("gin files: " + ", ".join(files), file=stream)
    if common:
        print("bindings common to all runs: " + "; ".join(common), file=stream)
    rows = []
    for r in runs:
        state = states[r.name]
        state = "done (skip)" if state == "done" else str(state or "new")
        own = [b for b in r.bindings if b not in common]
        gin = ",".join(Path(f).name for f in r.gin_files)
        rows.append([r.name, state, gin, "; ".join(own) or "-"])
    print(_table(rows, ["run", "state", "gin files", "bindings"]), file=stream, flush=True)


def _same_run_bindings(old: list[str], new: list[str]) -> bool:
    """Whether two runs' bindings make the same run: ``Runner.num_iterations`` may
    differ, as for ``moerl train`` (a larger one extends the run)."""
    identity = lambda bindings: [b for b in bindings if not NUM_ITERATIONS_RE.match(b)]
    return identity(old) == identity(new)


def _check_out_dir(spec: SweepSpec, runs: list[RunSpec],
                   out_dir: Path) -> tuple[str | None, set[str]]:
    """Refuses an out_dir holding something else, without writing; returns the
    ``created`` time of its manifest (None for a new out_dir) and the names of the
    runs whose ``Runner.num_iterations`` changed."""
    manifest_path = out_dir / "manifest.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise SweepError(f"out_dir {out_dir} is a file; choose a new or empty directory")
    if not manifest_path.exists():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise SweepError(f"{out_dir} is not empty and holds no sweep manifest.json; "
                             f"choose an empty or new out_dir")
        return None, set()
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        old_name = old["sweep"]
        old_runs = {r["name"]: r for r in old["runs"]}
        for o in old_runs.values():
            if not all(isinstance(o.get(k, []), list) for k in ("gin_files", "bindings")):
                raise TypeError("a run's gin_files or bindings is not a list")
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepError(f"{manifest_path} is unreadable or not a sweep manifest; choose "
                         f"another out_dir or remove that file") from None
    if old_name != spec.name:
        raise SweepError(f"{out_dir} holds sweep {old_name!r}, not {spec.name!r}; choose "
                         f"another out_dir")
    resized = set()
    for r in runs:
        o = old_runs.get(r.name)
        if o is not None and (list(o.get("gin_files", [])) != list(r.gin_files)
                              or not _same_run_bindings(o.get("bindings", []), r.bindings)):
            raise SweepError(f"{out_dir} holds run {r.name!r} of sweep {spec.name!r} with "
                             f"other gin files or bindings; choose another out_dir or "
                             f"restore the spec (Runner.num_iterations may change)")
        if o is not None and list(o.get("bindings", [])) != list(r.bindings):
            resized.add(r.name)
        name = Path(r.name)
        for path in (out_dir / p for p in (name, *name.parents[:-1])):  # not out_dir
            if path.exists() and not path.is_dir():
                raise SweepError(f"{path} is a file where run {r.name!r} keeps its "
                                 f"directory; move it away or choose another out_dir")
    return old.get("created"), resized


def _finished_iterations(run_dir: Path) -> int:
    """The iterations a run holds, as ``moerl train`` counts them when it resumes: its newest
    finished checkpoint's + 1 (``run_dir.finished_checkpoints``, which the Checkpointer
    reads too, from the listing alone, so that JAX stays out of this process), or 0 without a ``config.gin`` (such a
    run is not resumed) or without checkpoints."""
    if not (run_dir / CONFIG_FILE).is_file():
        return 0
    try:
        found = finished_checkpoints(str(run_dir / CHECKPOINT_DIR))
    except OSError:
        return 0
    return max(found, default=-1) + 1


def _bound_num_iterations(bindings: Sequence[str]) -> int | None:
    """The ``Runner.num_iterations`` the last such binding sets, or None when none does
    (the gin files decide) or its value is not an integer literal."""
    for b in reversed(bindings):
        if NUM_ITERATIONS_RE.match(b):
            try:
                value = ast.literal_eval(b.split("=", 1)[1].strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
            return value if is_int(value) else None
    return None


def check_num_iterations(runs: Iterable[RunSpec], out_dir: Path) -> None:
    """Refuses (SweepError) to start a run whose directory holds more finished iterations
    (``_finished_iterations``) than its ``Runner.num_iterations`` binding: ``moerl train``
    would refuse it in its own process. ``runs`` are those the sweep would (re)start, so
    lowering the count of a finished sweep is refused before anything is written. A run
    whose count comes from its gin files alone is left to ``moerl train``."""
    for r in runs:
        wanted = _bound_num_iterations(r.bindings)
        held = _finished_iterations(out_dir / r.name)
        if wanted is not None and held > wanted:
            raise SweepError(f"{out_dir} holds run {r.name!r} with {held} finished "
                             f"iterations, more than its Runner.num_iterations = {wanted}; "
                             f"bind Runner.num_iterations to {held} or more, or choose "
                             f"another out_dir")


def _write_manifest(spec: SweepSpec, runs: list[RunSpec], out_dir: Path,
                    created: str | None) -> None:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    manifest = {"sweep": spec.name, "spec_path": spec.path, "created": created or now,
                "updated": now, "runs": [r.to_dict() for r in runs]}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(str(out_dir / "manifest.json"), manifest)
    except OSError as e:
        raise SweepError(f"cannot write to out_dir {out_dir} ({e.strerror}); choose a writable "
                         f"directory") from None


RAY_CONNECT_TIMEOUT_S = 5.0
_HOST_PORT_RE = re.compile(r"^(?:\[(?P<v6>[^\]\s]+)\]|(?P<host>[^:/\[\]\s]+))"
                           r":(?P<port>\d{1,5})$")


def _ray_host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) that ``ray_address`` connects to: that of ``HOST:PORT`` or
    ``ray://HOST:PORT`` (an IPv6 host in brackets); None for 'auto', 'local' and other
    ``scheme://`` addresses, which Ray resolves itself. Refused (SweepError): any other
    address, or a port outside 1..65535."""
    if address in ("auto", "local"):
        return None
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":
        return None
    match = _HOST_PORT_RE.match(rest if sep else address)
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise SweepError(f"ray_address {address!r} is not 'auto', HOST:PORT or "
                         f"ray://HOST:PORT; fix --ray_address, e.g. head:6379")
    return match["v6"] or match["host"], int(match["port"])


# What an HTTP/2 client sends first: the connection preface and an empty SETTINGS frame.
# Ray's GCS and client servers speak gRPC, over HTTP/2, and answer with a SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5)


def _check_ray_reachable(address: str | None) -> None:
    """Refuses (SweepError) a ``HOST:PORT`` or ``ray://HOST:PORT`` ray_address that takes no
    TCP connection within RAY_CONNECT_TIMEOUT_S seconds, or whose server does not answer
    HTTP/2 as Ray's gRPC servers do (an HTTP/1 server, say): ``ray.init`` would retry
    either for ever. Other addresses are left to Ray."""
    where = None if address is None else _ray_host_port(address)
    if where is None:
        return
    try:
        conn = socket.create_connection(where, timeout=RAY_CONNECT_TIMEOUT_S)
    except (OSError, UnicodeError) as e:  # UnicodeError: a host name IDNA refuses
        reason = getattr(e, "strerror", None) or _first_line(e)
        raise SweepError(f"cannot reach the Ray cluster at {address} ({reason}); start it "
                         f"(ray start --head) or fix --ray_address") from None
    reply = b""
    with conn:
        try:
            conn.sendall(_HTTP2_PREFACE)
            while len(reply) < 9:  # a frame header
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
        except OSError:  # reset, or no answer within the timeout
            pass
    if len(reply) < 9 or reply[3] != 0x04:
        raise SweepError(f"{address} answers, but not as a Ray cluster (no gRPC reply); pass "
                         f"the address `ray start --head` prints, e.g. head:6379")


def _check_local_options(ray_address: str | None, resources: dict[str, float | None]) -> None:
    """Refuses (SweepError) the options that apply to the ray backend only: a ray_address,
    or a cpus_per_run / gpus_per_run request (None: not given)."""
    if ray_address is not None:
        raise SweepError(f"ray_address {ray_address!r} needs the ray backend; pass "
                         f"--backend ray, or drop --ray_address")
    for name, value in resources.items():
        if value is not None:
            raise SweepError(f"{name} {value!r} applies to the ray backend only (local runs "
                             f"are not limited); pass --backend ray, or drop --{name}")


def _check_options(backend: str, workers: int, cpus_per_run: float | None,
                   gpus_per_run: float | None, command_prefix: Sequence[str],
                   ray_address: str | None) -> None:
    """Refuses (SweepError) an unknown backend, ray-only options with the local backend
    (``_check_local_options``), a malformed ray_address (``_ray_host_port``), workers < 1,
    a resource request that is not finite and >= 0, and an empty command_prefix."""
    if backend not in ("local", "ray"):
        raise SweepError(f"unknown sweep backend {backend!r}; use 'local' or 'ray'")
    if backend == "local":
        _check_local_options(ray_address, {"cpus_per_run": cpus_per_run,
                                           "gpus_per_run": gpus_per_run})
    elif ray_address is not None:
        _ray_host_port(ray_address)
    if not isinstance(workers, int) or workers < 1:
        raise SweepError(f"workers must be a positive integer, got {workers!r}; pass "
                         f"--workers 1 or more")
    if not all(math.isfinite(v) and v >= 0 for v in (cpus_per_run, gpus_per_run)
               if v is not None):
        raise SweepError(f"cpus_per_run and gpus_per_run must be finite and >= 0, got "
                         f"{cpus_per_run!r} and {gpus_per_run!r}; fix the resource request")
    if not command_prefix:
        raise SweepError("command_prefix is empty; pass the trainer command, e.g. "
                         "('moerl', 'train')")


def _plan_jobs(spec: SweepSpec, runs: list[RunSpec], todo: list[RunSpec],
               seeds_per_process: bool) -> list[Job]:
    """The jobs that run ``todo``. With ``seeds_per_process`` every run of the sweep,
    finished or not, must group (``group_seeds``), so a rerun refuses what a first run
    refuses."""
    if not seeds_per_process:
        return [Job(r, (r,)) for r in todo]
    group_seeds(spec, runs)
    return group_seeds(spec, todo)


def run_sweep(spec_path: str | os.PathLike, out_dir: str | os.PathLike, *, workers: int = 1,
              backend: str = "local", ray_address: str | None = None, dry_run: bool = False,
              command_prefix: Sequence[str] = ("moerl", "train"),
              validate_binding: Callable[[str], None] | None = None,
              effective_configs: EffectiveConfigs | None = None,
              cpus_per_run: float | None = None, gpus_per_run: float | None = None,
              seeds_per_process: bool = False,
              stream: TextIO | None = None) -> SweepResult:
    """Expand the spec at ``spec_path`` and run every unfinished run into ``out_dir/<name>``.

    With ``seeds_per_process``, consecutive seeds of one run share a process
    (``moerl train --num_seeds``; see ``group_seeds``). See the module docstring for
    the output layout and backends; ``cpus_per_run`` and ``gpus_per_run`` (ray backend
    only) default to 1 CPU and no GPU. Raises SweepError for bad input (spec, options,
    out_dir, a lowered ``Runner.num_iterations``, job grouping, an unreachable
    ``ray_address``) before anything is written, in a dry run too; a failing run is
    recorded in ``SweepResult.failed`` and does not stop the others. With
    ``effective_configs``, each distinct config is built once first (``check_configs``;
    on a terminal, a progress line shows which).
    """
    stream = sys.stderr if stream is None else stream
    _check_options(backend, workers, cpus_per_run, gpus_per_run, command_prefix, ray_address)
    spec = load_spec(spec_path)
    runs = expand(spec, validate_binding=validate_binding)
    out = Path(out_dir).expanduser().resolve()
    created, resized = _check_out_dir(spec, runs, out)
    states = {r.name: _read_status(out / r.name).get("state") for r in runs}
    for name in resized:  # a done run with another Runner.num_iterations: resume it
        if states[name] == "done":
            states[name] = "done, num_iterations changed"
    todo = [r for r in runs if states[r.name] != "done"]
    check_num_iterations(todo, out)
    jobs = _plan_jobs(spec, runs, todo, seeds_per_process)
    if backend == "ray" and jobs:
        _check_ray_reachable(ray_address)
    if effective_configs is not None:
        check_configs(spec, runs, effective_configs, stream)
    result = SweepResult(out_dir=str(out), runs=runs, dry_run=dry_run)

    if dry_run:
        _print_plan(spec, runs, states, out, stream)
        return result

    if backend == "local" and shutil.which(command_prefix[0]) is None:
        raise SweepError(f"command {command_prefix[0]!r} was not found on PATH; install moerl "
                         f"(pip install -e .) or fix the command")
    with contextlib.ExitStack() as ray_session:
        if backend == "ray" and jobs:  # joined or started before anything is written
            ray_session.enter_context(_ray_session(ray_address, workers))
        _run_jobs(spec, runs, jobs, states, out, created, result, backend, workers,
                  command_prefix, stream,
                  cpus_per_run=1.0 if cpus_per_run is None else cpus_per_run,
                  gpus_per_run=0.0 if gpus_per_run is None else gpus_per_run)
    return result


def _run_jobs(spec: SweepSpec, runs: list[RunSpec], jobs: list[Job], states: dict,
              out: Path, created: str | None, result: SweepResult, backend: str,
              workers: int, command_prefix: Sequence[str], stream: TextIO, *,
              cpus_per_run: float, gpus_per_run: float) -> None:
    """Writes the manifest, runs ``jobs`` and fills ``result`` (``run_sweep``'s execution:
    its checks have passed, and a Ray session is open for the ray backend)."""
    todo = [r for r in runs if states[r.name] != "done"]
    _write_manifest(spec, runs, out, created)
    result.skipped = [RunOutcome(r.name, "skipped", 0.0, "already done", None,
                                 str(out / r.name))
                      for r in runs if states[r.name] == "done"]
    start = time.monotonic()
    print(f"sweep {spec.name!r}: {len(runs)} run(s), {len(result.skipped)} already done, "
          f"{len(todo)} to run with {backend} backend into {out}", file=stream, flush=True)
    progress = _Progress(len(runs), len(result.skipped), stream)

    def record(r: RunSpec, rc: int | None, seconds: float, error: str | None,
               log: Path) -> None:
        run_dir = out / r.name
        status = _read_status(run_dir)
        if rc == 0 and error is None and status.get("state") != "failed":
            outcome = RunOutcome(r.name, "done", seconds, None, rc, str(run_dir))
            result.done.append(outcome)
        else:
            outcome = RunOutcome(r.name, "failed", seconds,
                                 _failure_reason(run_dir, log, rc, error), rc, str(run_dir),
                                 str(log))
            result.failed.append(outcome)
        progress.finished(outcome)

    def record_job(job: Job, rc: int | None, seconds: float, error: str | None) -> None:
        log = out / job.run.name / SWEEP_LOG  # a seed group's is in the group's directory
        for member in job.members:
            record(member, rc, seconds, error, log)

    try:
        if jobs and backend == "local":
            _run_local(jobs, out, workers, command_prefix, record_job)
        elif jobs:
            _run_ray(jobs, out, command_prefix, cpus_per_run, gpus_per_run, record_job)
    finally:
        progress.close()

    order = {r.name: i for i, r in enumerate(runs)}
    for lst in (result.done, result.failed, result.skipped):
        lst.sort(key=lambda o: order[o.name])
    _print_closing(spec, result, order, time.monotonic() - start, stream)


def _run_local(jobs, out: Path, workers: int, command_prefix, record) -> None:
    procs: set = set()
    lock = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    futures = {pool.submit(_execute, job.command(out, command_prefix),
                           str(out / job.run.name), procs, lock): job for job in jobs}
    try:
        for fut in concurrent.futures.as_completed(futures):
            record(futures[fut], *fut.result())
    except BaseException:
        for f in futures:
            f.cancel()
        with lock:
            for p in list(procs):
                p.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _ray_session(ray_address: str | None, workers: int) -> Iterator[None]:
    """Joins the Ray cluster at ``ray_address`` (or starts a local Ray with ``workers``
    CPUs) unless Ray is already initialised, and shuts down what it started. Refused
    (SweepError, one line): Ray not installed; any failure of ``ray.init``."""
    try:
        import ray
    except ImportError:
        raise SweepError("the ray backend needs Ray; install it (pip install 'moerl[ray]') or "
                         "use --backend local") from None
    if ray.is_initialized():
        yield
        return
    try:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError, Ray's own errors
        with contextlib.suppress(Exception):
            ray.shutdown()  # whatever a failed start left running
        raise SweepError(f"cannot start or reach Ray at {ray_address or 'local'} "
                         f"({_first_line(e)}); check --ray_address") from None
    try:
        yield
    finally:
        ray.shutdown()


def _run_ray(jobs, out: Path, command_prefix, cpus_per_run, gpus_per_run, record) -> None:
    """Runs each job as a Ray task (in the session ``_ray_session`` opened)."""
    import ray
    task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run)(_execute)
    refs = {task.remote(job.command(out, command_prefix), str(out / job.run.name)): job
            for job in jobs}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    rc, seconds, error = ray.get(ref)
                except Exception as e:  # a task crashed or its node died
                    rc, seconds, error = None, 0.0, f"ray task failed: {type(e).__name__}"
                record(refs[ref], rc, seconds, error)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _print_closing(spec: SweepSpec, result: SweepResult, order: dict[str, int],
                   elapsed: float, stream: TextIO) -> None:
    outcomes = sorted(result.done + result.failed + result.skipped, key=lambda o: order[o.name])
    rows = [[o.name, o.state, f"{o.seconds:.1f}", o.reason if o.state == "failed" else ""]
            for o in outcomes]
    print(_table(rows, ["run", "state", "seconds", "reason"]), file=stream)
    print(f"sweep {spec.name!r} finished in {_fmt_seconds(elapsed)}: {len(result.done)} done, "
          f"{len(result.failed)} failed, {len(result.skipped)} skipped, {len(outcomes)} total"
          + (f"; logs in {_log_hint(result)}" if result.failed else ""),
          file=stream, flush=True)


def _log_hint(result: SweepResult) -> str:
    """Where the failed runs' logs are: the one file, or the pattern when each run
    wrote its own (a seed group writes one for its seeds, in the group's directory)."""
    logs = sorted({o.log for o in result.failed})
    if len(logs) == 1:
        return logs[0]
    if all(o.log == os.path.join(o.base_dir, SWEEP_LOG) for o in result.failed):
        return f"{result.out_dir}/<run>/{SWEEP_LOG}"
    return f"{result.out_dir}/<run or seed group>/{SWEEP_LOG}"
