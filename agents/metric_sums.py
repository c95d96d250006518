"""Train-step metrics summed on the device, without a dispatch per step.

Every gradient step returns a dict of metrics (device arrays). Summing them as
they come costs one jitted call per step (about 0.3 ms on 2 CPU cores, next to
a 3 ms CartPole update). `MetricSums` queues them instead and folds `CHUNK`
steps at a time in one call, in step order, so the sums are the same numbers a
per-step fold gives.

Weights count gradient steps: a scalar for one agent (K for K fused steps whose
metrics are their mean), or one per seed ([S], 0 for a seed that did not
update) when every metric leaf carries a leading seed axis. `latest` keeps the
newest value of one extra tree (the features' Gram matrix) per seed.
"""

from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 32


def _expand(weight, x):
  """weight [] or [S] -> broadcastable against x [S?, ...]."""
  return weight.reshape(weight.shape + (1,) * (x.ndim - weight.ndim))


@jax.jit
def _fold(sums, latest, entries, weights, latests):
  """sums + sum_i weights[i] * entries[i], in order; latest <- latests[i] where weights[i] > 0."""
  for i, entry in enumerate(entries):
    w = weights[i]  # [] or [S]
    if sums is None:
      sums = jax.tree_util.tree_map(lambda x: jnp.zeros_like(_expand(w, x) * x), entry)
    sums = jax.tree_util.tree_map(lambda a, x, w=w: a + _expand(w, x) * x, sums, entry)
    if latests[i] is not None:
      new = latests[i]
      latest = new if latest is None else jnp.where(_expand(w > 0, new), new, latest)
  return sums, latest


class MetricSums:
  """Running weighted sums of train-step metrics (see the module docstring)."""

  def __init__(self):
    self.clear()

  def clear(self) -> None:
    self._queue: List[Tuple[Any, np.ndarray, Any]] = []
    self._sums, self._latest = None, None
    self.total = None  # summed weights (numpy), None before the first add

  def add(self, metrics, weight, latest=None) -> None:
    weight = np.asarray(weight, np.float32)
    self._queue.append((metrics, weight, latest))
    self.total = weight.copy() if self.total is None else self.total + weight
    if len(self._queue) == CHUNK:
      self._flush()

  def _flush(self) -> None:
    if not self._queue:
      return
    first, weight, latest = self._queue[0]
    # Padding with weight 0 keeps one compiled shape for partial chunks.
    padding = [(first, np.zeros_like(weight), latest)] * (CHUNK - len(self._queue))
    entries, weights, latests = zip(*(self._queue + padding))
    self._sums, self._latest = _fold(self._sums, self._latest, list(entries),
                                     np.stack(weights), list(latests))
    self._queue = []

  def pop(self) -> Optional[Tuple[dict, np.ndarray, Any]]:
    """(sums, summed weights, latest) on the host, then cleared; None if nothing
    was added or every weight was 0."""
    self._flush()
    result = None
    if self.total is not None and np.any(self.total > 0):
      sums, latest = jax.device_get((self._sums, self._latest))
      result = sums, self.total, latest
    self.clear()
    return result

  def seed(self, index: int) -> 'MetricSums':
    """The sums of seed `index` (weights [S]) as a one-agent MetricSums."""
    self._flush()
    part = MetricSums()
    if self.total is not None and self.total[index] > 0:
      pick = lambda tree: jax.tree_util.tree_map(lambda x: x[index], tree)
      part._sums = pick(self._sums)
      part._latest = None if self._latest is None else pick(self._latest)
      part.total = np.asarray(self.total[index])
    return part
