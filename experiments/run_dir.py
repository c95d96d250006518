"""The run directory (``--base_dir``): layout, atomic writes, config guard, status.

Layout (README, "Run directory")::

    config.gin            the operative gin config, written by ``RunDir.prepare``
    metrics.jsonl         one JSON object per iteration (``experiments.logger``)
    events.out.tfevents.* TensorBoard scalars (``experiments.logger``)
    checkpoints/          last checkpoints (``experiments.checkpoints``)
    status.json           {"state", "error", "iteration", "updated"}

Guarantees:

* Every whole-file write goes through ``atomic_write_bytes`` (temp file in the same
  directory, flush, fsync, ``os.replace``, fsync of the directory), so a reader or a
  killed process sees either the old file or the new one, never a half-written one.
* ``RunDir.prepare`` refuses, before writing anything, a ``base_dir`` that cannot be
  created or written, one that holds files that are not a moerl run ("foreign"), and
  one that holds a run of a different config. Refusals raise ``RunDirError`` whose
  message is one sentence naming the problem and the fix; the CLI prints it on one
  line and exits with status 2.
* One process at a time trains in a run directory: ``RunDir.lock`` takes an ``flock``
  on the directory itself (no file is written) and refuses a directory another
  process holds; the kernel releases it when that process ends, however it ends.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import stat
import tempfile
from typing import Any

CONFIG_FILE = "config.gin"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
CHECKPOINT_DIR = "checkpoints"

# Entries whose presence marks a directory as a moerl run.
SWEEP_LOG = "sweep.log"
_RUN_MARKERS = (CONFIG_FILE, STATUS_FILE, METRICS_FILE)
_SEED_DIR = re.compile(r"seed\d+")
STATES = ("running", "done", "failed")


_FINISHED_CHECKPOINT_RE = re.compile(r"^ckpt_(\d+)(\.old)?$")


def finished_checkpoints(checkpoint_dir: str) -> dict[int, str]:
  """Paths of the finished checkpoints in ``checkpoint_dir`` by iteration
  (``experiments.checkpoints`` writes them): ``ckpt_<i>/``, or ``ckpt_<i>.old/``
  where a save killed while replacing ``ckpt_<i>`` left only that one. Reads the
  directory listing only (no JAX), so a sweep can count a run's iterations;
  FileNotFoundError is {}."""
  try:
    names = os.listdir(checkpoint_dir)
  except FileNotFoundError:
    return {}
  found = {}
  for name in names:
    match = _FINISHED_CHECKPOINT_RE.match(name)
    full = os.path.join(checkpoint_dir, name)
    if not match or not os.path.isdir(full):
      continue
    iteration, is_old = int(match.group(1)), bool(match.group(2))
    if not is_old or iteration not in found:
      found[iteration] = full
  return found


def holds_run(path: str) -> bool:
  """Whether directory ``path`` holds a moerl run (any of its marker files)."""
  return any(os.path.exists(os.path.join(path, m)) for m in _RUN_MARKERS)


def seed_group_dirs(path: str) -> list[str]:
  """The ``seed<k>`` subdirectories of ``path`` that hold runs: a ``moerl train
  --num_seeds`` group's seeds when ``path`` is its ``--base_dir``."""
  try:
    names = os.listdir(path)
  except OSError:
    return []
  return sorted((n for n in names if _SEED_DIR.fullmatch(n)
                 and holds_run(os.path.join(path, n))), key=lambda n: int(n[4:]))


def group_hint(path: str) -> str:
  """'' or a sentence saying that ``path`` is a seed group's directory."""
  seeds = seed_group_dirs(path)
  if not seeds:
    return ""
  return (f" It holds a --num_seeds group ({', '.join(seeds)}): pass --num_seeds to "
          f"train the group, or one seed's directory ({os.path.join(path, seeds[0])}).")


# The process umask, read once (reading it means setting it): new files get the
# mode open() would give them, not mkstemp's private 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class RunDirError(ValueError):
  """Bad run-directory input; the message names the problem and the fix."""


class Terminated(KeyboardInterrupt):
  """SIGTERM (`kill`, Slurm, `docker stop`, a stopped sweep), raised where the
  program is, as Ctrl-C raises KeyboardInterrupt: a run records why it
  stopped in status.json before it exits."""


def fsync_dir(path: str) -> None:
  """Flushes a directory entry (a rename or a new file) to disk, where supported."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # Some filesystems do not support fsync on directories.
  finally:
    os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Replaces ``path`` with ``data`` atomically (temp file, fsync, os.replace).

  The file keeps the mode of the one it replaces (a new file gets the umask's).
  Raises OSError if the directory is not writable; no temp file is left behind.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  try:
    mode = stat.S_IMODE(os.stat(path).st_mode)
  except OSError:
    mode = 0o666 & ~_UMASK
  fd, tmp_path = tempfile.mkstemp(
      dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), mode)
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    try:
      os.unlink(tmp_path)
    except OSError:
      pass
    raise
  fsync_dir(directory)


def check_output_files(*paths: str) -> None:
  """RunDirError unless each path can be written as a file: not a directory, and
  in a directory that takes new files. Called before long work whose result
  goes there, so that a bad path fails at once."""
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      raise RunDirError(f"{path} is a directory, but the output file goes there; "
                        "move it away.")
    directory = os.path.dirname(os.path.abspath(path))
    try:
      fd, probe = tempfile.mkstemp(dir=directory, prefix=".write_test.")
      os.close(fd)
      os.unlink(probe)
    except OSError as e:
      raise RunDirError(f"{path} cannot be written ({e.strerror}); fix the "
                        "directory's permissions or write elsewhere.") from None


def atomic_write_text(path: str, text: str) -> None:
  """Replaces ``path`` with UTF-8 ``text`` atomically."""
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
  """Replaces ``path`` with ``obj`` as indented JSON atomically."""
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def figure_bytes(fig, path: str, dpi: int = 110) -> bytes:
  """A matplotlib figure rendered in memory, in the format `path` names."""
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(path)[1].lstrip('.') or 'png',
              dpi=dpi)
  return buffer.getvalue()


def atomic_save_figure(fig, path: str, dpi: int = 110) -> None:
  """Renders a matplotlib figure in memory, then writes it atomically."""
  atomic_write_bytes(path, figure_bytes(fig, path, dpi))


def normalise_config(text: str) -> str:
  """Canonical form of a gin config for comparison.

  Drops full-line comments and blank lines, joins the remaining lines (so line
  wrapping does not matter), collapses whitespace runs and removes whitespace next to
  punctuation (``a = 1`` equals ``a=1``; ``'x y'`` still differs from ``'xy'``).
  """
  lines = [line.strip() for line in text.splitlines()]
  body = " ".join(l for l in lines if l and not l.startswith("#"))
  body = re.sub(r"\s+", " ", body)
  return re.sub(r"\s*([^\w\s])\s*", r"\1", body).strip()


NUM_ITERATIONS_RE = re.compile(r"^\s*Runner\.num_iterations\s*=.*$", re.MULTILINE)


def _run_identity(config: str) -> str:
  """What makes two configs the same run: everything but the number of
  iterations, so a finished run can be extended (as in Dopamine) by resuming
  it with a larger `Runner.num_iterations`."""
  return normalise_config(NUM_ITERATIONS_RE.sub("", config))


def _now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunDir:
  """Paths and lifecycle of one run directory."""

  def __init__(self, base_dir: str):
    self.base_dir = os.path.abspath(os.path.expanduser(os.fspath(base_dir)))
    self._lock_fd: int | None = None

  def _ensure_dir(self) -> None:
    """Creates ``base_dir`` if missing; RunDirError if it is a file or cannot be
    created."""
    base = self.base_dir
    if os.path.exists(base) and not os.path.isdir(base):
      raise RunDirError(
          f"--base_dir {base} is a file, not a directory; "
          "pass a directory path for --base_dir.")
    try:
      os.makedirs(base, exist_ok=True)
    except OSError as e:
      raise RunDirError(
          f"--base_dir {base} cannot be created ({e.strerror}); "
          "choose a --base_dir in a writable location.") from None

  def lock(self) -> None:
    """Takes the directory (created if missing) for this process until
    ``unlock`` or the process ends; RunDirError while another process trains
    in it. Taken before ``prepare`` reads or writes it, so that two commands
    started together never both judge it. Where the filesystem cannot lock a
    directory (some network filesystems), the run goes on unlocked."""
    if self._lock_fd is not None:
      return
    self._ensure_dir()
    try:
      fd = os.open(self.base_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
      return
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise RunDirError(
          f"--base_dir {self.base_dir} is in use: another moerl process is training "
          "in it; wait for it to end (status.json), or use a new --base_dir.") from None
    except OSError:  # e.g. ENOLCK, EINVAL: no directory locks here
      os.close(fd)
      return
    self._lock_fd = fd

  def unlock(self) -> None:
    if self._lock_fd is not None:
      os.close(self._lock_fd)  # releases the flock
      self._lock_fd = None

  @property
  def config_path(self) -> str:
    return os.path.join(self.base_dir, CONFIG_FILE)

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.base_dir, METRICS_FILE)

  @property
  def status_path(self) -> str:
    return os.path.join(self.base_dir, STATUS_FILE)

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.base_dir, CHECKPOINT_DIR)

  def check_layout(self) -> None:
    """RunDirError unless each of the run's entries present is a file or a
    directory as the layout says (a hand-made mix-up reads as a clear error)."""
    for name, is_dir in ((CONFIG_FILE, False), (METRICS_FILE, False),
                         (STATUS_FILE, False), (CHECKPOINT_DIR, True)):
      path = os.path.join(self.base_dir, name)
      if os.path.exists(path) and os.path.isdir(path) != is_dir:
        want, got = ("directory", "file") if is_dir else ("file", "directory")
        raise RunDirError(
            f"{path} is a {got}, but a moerl run keeps a {want} there; move it "
            "away or use a new --base_dir.")

  def prepare(self, operative_config: str, resume_allowed: bool = True) -> bool:
    """Creates or validates ``base_dir``; writes ``config.gin`` for a new run.

    Returns True when this is a resume: ``config.gin`` already holds the same run's
    config (compared with ``_run_identity``: ``Runner.num_iterations`` may differ).
    A resume writes nothing here: the caller rewrites ``config.gin`` with
    ``write_config`` once the checkpoint is restored. Raises RunDirError, without
    writing anything, when ``base_dir`` is not a creatable, writable directory, holds
    files that are not a moerl run or are misplaced (``check_layout``), holds a run of
    a different config, or holds a run of the same config while ``resume_allowed``
    is False.
    """
    base = self.base_dir
    resume = False
    if not os.path.isdir(base):
      self._ensure_dir()  # a file there, or not creatable: RunDirError
    else:
      try:
        entries = os.listdir(base)
      except OSError as e:
        raise RunDirError(
            f"--base_dir {base} cannot be read ({e.strerror}); "
            "fix its permissions or use a different --base_dir.") from None
      # `moerl sweep` creates a run's directory with its sweep.log first.
      if (set(entries) - {SWEEP_LOG}) and not any(m in entries for m in _RUN_MARKERS):
        hint = group_hint(base)
        if hint:
          raise RunDirError(f"--base_dir {base} is not a run.{hint}")
        raise RunDirError(
            f"--base_dir {base} is a foreign directory (not empty and not a moerl "
            "run); use a new or empty --base_dir.")
      self.check_layout()
      if CONFIG_FILE in entries:
        try:
          with open(self.config_path, encoding="utf-8") as f:
            existing = f.read()
        except (OSError, UnicodeDecodeError) as e:
          raise RunDirError(
              f"{self.config_path} cannot be read ({e}); "
              "fix or delete it, or use a new --base_dir.") from None
        if _run_identity(existing) != _run_identity(operative_config):
          raise RunDirError(
              f"--base_dir {base} holds a run of a different config (see "
              f"{self.config_path}); use a new --base_dir, or the same gin files "
              "and bindings to resume that run (Runner.num_iterations may change).")
        if not resume_allowed:
          raise RunDirError(
              f"--base_dir {base} already holds a run and resuming is disabled; "
              "use a new --base_dir or allow resuming.")
        resume = True
    if resume:
      check_output_files(self.config_path)  # written once the resume is sure
    else:
      self.write_config(operative_config)
    return resume

  def write_config(self, operative_config: str) -> None:
    """Writes ``config.gin`` (atomically; untouched when it holds this text)."""
    try:
      with open(self.config_path, encoding="utf-8") as f:
        if f.read() == operative_config:
          return
    except (OSError, UnicodeDecodeError):
      pass
    try:
      atomic_write_text(self.config_path, operative_config)
    except OSError as e:
      raise RunDirError(
          f"--base_dir {self.base_dir} is not writable ({e.strerror}); "
          "fix its permissions or choose a writable --base_dir.") from None

  def write_status(self, state: str, iteration: int,
                   error: str | None = None) -> None:
    """Atomically writes status.json: {"state", "error", "iteration", "updated"}."""
    if state not in STATES:
      raise RunDirError(
          f"run state {state!r} is unknown; use one of {', '.join(STATES)}.")
    atomic_write_json(self.status_path, {
        "state": state,
        "error": error,
        "iteration": int(iteration),
        "updated": _now_iso(),
    })

  def read_status(self) -> dict | None:
    """Returns the parsed status.json (see ``read_status``)."""
    return read_status(self.base_dir)


def read_status(base_dir: str | os.PathLike) -> dict | None:
  """Returns the parsed ``base_dir/status.json``, or None if there is none yet.

  Raises RunDirError when the file exists but cannot be read or is not a JSON
  object; callers that treat such a run as unfinished catch it.
  """
  path = os.path.join(os.fspath(base_dir), STATUS_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      status = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise RunDirError(
        f"{path} cannot be read ({e}); "
        "delete it (it is rewritten on the next start).") from None
  if not isinstance(status, dict):
    raise RunDirError(
        f"{path} holds {type(status).__name__}, not a JSON object; "
        "delete it (it is rewritten on the next start).")
  return status
