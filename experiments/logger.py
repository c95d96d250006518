"""The one logging sink: per-iteration metrics to metrics.jsonl and TensorBoard.

``metrics.jsonl`` holds one JSON object per line, one line per iteration, each with an
``iteration`` key (schema: README, "Run directory"). numpy / jax scalars become
Python numbers; NaN and +-inf become ``null`` so every line is strict JSON. Each line
is appended with a single ``write`` call followed by flush and ``os.fsync``, so a
killed process leaves at most one torn (newline-less) last line.

Guarantees:

* ``read_metrics`` drops a torn last line; a complete line that does not parse is
  reported as a RunDirError (the file was edited or damaged), or skipped with
  ``lenient=True`` (read-only views such as plots).
* ``truncate_metrics`` (called on resume with the restored checkpoint's iteration)
  atomically rewrites the file keeping only records with ``iteration <= N``, one per
  iteration, with no torn line, so a kill/restart never duplicates iterations.
* ``MetricsLogger`` drops a torn tail before its first append, so a new line is never
  glued onto a partial one.

The TensorBoard event file (tensorboardX, no TensorFlow) in the same directory gets
every numeric scalar of each record as a scalar with step ``metrics['iteration']``;
keys such as ``moe/expert_share_3`` are used as tags unchanged. Pass ``purge_step`` on
resume so TensorBoard discards events of earlier processes at or after that step.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from typing import Any, Iterable

import numpy as np

from experiments.run_dir import METRICS_FILE, RunDirError, atomic_write_bytes
from networks.checks import is_int


def _to_python(value: Any, key: str) -> Any:
  """Converts numpy / jax values to JSON-able Python values; non-finite -> None."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {str(k): _to_python(v, f"{key}/{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v, key) for v in value]
  if hasattr(value, "__array__"):  # numpy / jax arrays, including 0-d ones.
    array = np.asarray(value)
    if array.dtype.kind in "biuf":
      return _to_python(array.item() if array.ndim == 0 else array.tolist(), key)
  raise TypeError(
      f"metric {key!r} has type {type(value).__name__}, which cannot be logged; "
      "log numbers, strings, None, or lists / dicts of them.")


def _scalar(value: Any) -> float | None:
  """The value as a float if it is a numeric scalar (bools excluded), else None."""
  if isinstance(value, (bool, np.bool_)) or value is None:
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
    array = np.asarray(value)
    if array.ndim == 0 and array.dtype.kind in "iuf":
      return float(array)
  return None


def _split_lines(data: bytes) -> tuple[list[bytes], bool]:
  """Complete lines of ``data`` (without newlines) and whether a torn tail existed."""
  parts = data.split(b"\n")
  tail = parts.pop()  # b"" when data ends with a newline.
  return [p for p in parts if p.strip()], bool(tail.strip())


def _parse_lines(path: str, lines: list[bytes], lenient: bool = False) -> list[dict]:
  """The JSON objects of ``lines``; a line that is none raises, or is skipped if lenient."""
  records = []
  for number, line in enumerate(lines, start=1):
    try:
      record = json.loads(line)
    except ValueError:  # Includes bytes that are not UTF-8.
      record = None
    if isinstance(record, dict):
      records.append(record)
    elif not lenient:
      raise RunDirError(
          f"{path} line {number} is not a JSON object; "
          "delete or repair that line.")
  return records


def read_metrics(path: str, *, lenient: bool = False) -> list[dict]:
  """Returns the records of a metrics.jsonl file in file order.

  ``path`` may be the file or the run directory holding it. Both modes drop blank
  lines and a torn (newline-less) last line, which a run killed mid-write or still
  being written leaves. A complete line that is not a JSON object (invalid JSON,
  bytes that are not UTF-8, or a JSON list / number / string) raises RunDirError
  naming the line, unless ``lenient``: then it is skipped, so a read-only view of a
  damaged run shows the rest. Either way records are returned as logged: one whose
  ``iteration`` is missing or repeated is the caller's to judge.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path, "rb") as f:
    lines, _ = _split_lines(f.read())
  return _parse_lines(path, lines, lenient)


def truncate_metrics(path: str, last_iteration: int) -> None:
  """Atomically keeps only records with ``iteration <= last_iteration``.

  Torn lines are dropped; of records repeating an iteration only the latest is
  kept; kept lines are written back byte for byte in iteration order. A missing
  file is left missing. ``path`` may be the file or the run directory.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return
  lines, _ = _split_lines(data)
  latest: dict[int, bytes] = {}
  for line, record in zip(lines, _parse_lines(path, lines)):
    iteration = record.get("iteration")
    if isinstance(iteration, int) and iteration <= last_iteration:
      latest[iteration] = line
  kept = b"".join(latest[i] + b"\n" for i in sorted(latest))
  if kept != data:
    atomic_write_bytes(path, kept)


class MetricsLogger:
  """Writes each iteration's metrics dict to metrics.jsonl and TensorBoard."""

  def __init__(self, base_dir: str, purge_step: int | None = None):
    """Opens the sink in ``base_dir`` (created if missing).

    Args:
      base_dir: the run directory.
      purge_step: on resume, the first iteration this process logs; TensorBoard
        then hides events at or after it that an earlier process wrote.
    """
    self.base_dir = os.fspath(base_dir)
    os.makedirs(self.base_dir, exist_ok=True)
    self.metrics_path = os.path.join(self.base_dir, METRICS_FILE)
    self._drop_torn_tail()
    from tensorboardX import SummaryWriter  # Deferred: only loggers need it.
    # A NaN scalar (a diverged loss) is written as NaN on purpose; tensorboardX
    # would also print a warning line for it in the middle of the progress output.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    # tensorboardX names event files by the second and opens them with "wb": a
    # restart within the same second would overwrite the earlier file. A
    # nanosecond suffix keeps names unique and sorted in creation order, the order
    # in which TensorBoard reads them (and applies purge_step).
    self._writer = SummaryWriter(
        logdir=self.base_dir, purge_step=purge_step, flush_secs=30,
        filename_suffix=f".{time.time_ns():020d}")
    self._closed = False

  def _drop_torn_tail(self) -> None:
    try:
      with open(self.metrics_path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return
    lines, torn = _split_lines(data)
    if torn:
      atomic_write_bytes(self.metrics_path, b"".join(l + b"\n" for l in lines))

  def write(self, metrics: dict) -> None:
    """Appends ``metrics`` as one JSON line (fsync'd) and its scalars to TensorBoard.

    ``metrics['iteration']`` (an int) is the TensorBoard step.
    """
    if "iteration" not in metrics:
      raise KeyError("metrics need an 'iteration' key (the TensorBoard step).")
    record = {str(k): _to_python(v, str(k)) for k, v in metrics.items()}
    step = record["iteration"]
    if not is_int(step):
      raise TypeError(f"metrics['iteration'] must be an int, got {step!r}.")
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      written = os.write(fd, line)
      while written < len(line):  # Only on exotic filesystems.
        written += os.write(fd, line[written:])
      os.fsync(fd)
    finally:
      os.close(fd)
    for key, value in metrics.items():
      if key == "iteration":
        continue
      scalar = _scalar(value)
      if scalar is not None:
        self._writer.add_scalar(str(key), scalar, global_step=step)
    self._writer.flush()

  def histogram(self, tag: str, values: Iterable[float] | np.ndarray,
                step: int) -> None:
    """Writes a TensorBoard histogram of ``values`` (flattened) at ``step``."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    array = array[np.isfinite(array)]
    if array.size:
      self._writer.add_histogram(tag, array, global_step=int(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    if not self._closed:
      self._writer.close()
      self._closed = True

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
