"""A vectorised numpy sum tree for proportional prioritized replay.

The tree is one flat float64 array in heap layout: node 1 is the root, node ``i`` has children
``2i`` and ``2i + 1``, and the ``capacity`` leaves sit at ``num_leaves + index`` with
``num_leaves`` the next power of two (padding leaves hold 0 and are never sampled).

Every operation works on a whole batch of indices with numpy, one level of the tree at a time:

* ``set(indices, values)`` writes leaves (with duplicate indices the last write wins) and
  recomputes each touched ancestor as the sum of its two children, so internal nodes never drift.
* ``find_prefix_sum(targets)`` returns, for each target in ``[0, total())``, the first index whose
  cumulative sum exceeds it (``np.searchsorted(np.cumsum(leaves), target, side='right')``).
* ``sample(rng, batch_size)`` is stratified as in Dopamine: the total is split into
  ``batch_size`` equal segments and one target is drawn uniformly inside each.

``max_recorded`` is the largest value ever written (used to give new replay records the maximum
priority); it starts at 1.0 as in Dopamine.
"""

from __future__ import annotations

import numpy as np

_SCALAR_PATH_MAX = 4  # set() with at most this many indices walks the tree in Python.
_SEARCHSORTED_LEVEL = 12  # find_prefix_sum resolves the top 12 levels with one searchsorted.


class SumTree:
  """Sum tree over ``capacity`` non-negative values; see the module docstring."""

  def __init__(self, capacity: int):
    if not isinstance(capacity, (int, np.integer)) or capacity < 1:
      raise ValueError(f'SumTree capacity must be an integer >= 1, got {capacity!r}.')
    self._capacity = int(capacity)
    self._depth = max(int(np.ceil(np.log2(self._capacity))), 0)
    self._num_leaves = 1 << self._depth
    self._nodes = np.zeros(2 * self._num_leaves, dtype=np.float64)
    self.max_recorded = 1.0

  @property
  def capacity(self) -> int:
    return self._capacity

  def total(self) -> float:
    """Sum of all values."""
    return float(self._nodes[1])

  def get(self, indices) -> np.ndarray:
    """Values at `indices` (float64, same shape as `indices`)."""
    indices = self._check_indices(indices)
    return self._nodes[self._num_leaves + indices]

  def set(self, indices, values) -> None:
    """Writes `values` at `indices`; for duplicated indices the last write wins."""
    indices = self._check_indices(indices).ravel()
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), indices.shape)
    if indices.size == 0:
      return
    if not np.all(np.isfinite(values)) or np.any(values < 0):
      raise ValueError('SumTree values must be finite and >= 0.')
    if indices.size > 1:
      # Keep the last occurrence of each index.
      rev_unique, rev_pos = np.unique(indices[::-1], return_index=True)
      values = values[::-1][rev_pos]
      indices = rev_unique
    self.max_recorded = max(self.max_recorded, float(values.max()))
    if indices.size <= _SCALAR_PATH_MAX:
      # A few leaves (e.g. one record per env on add): plain Python beats ~5 numpy calls/level.
      tree = self._nodes
      for index, value in zip(indices.tolist(), values.tolist()):
        node = self._num_leaves + index
        tree[node] = value
        node >>= 1
        while node:
          tree[node] = tree[2 * node] + tree[2 * node + 1]
          node >>= 1
      return
    self._nodes[self._num_leaves + indices] = values
    nodes = np.unique((self._num_leaves + indices) >> 1) if indices.size > 1 else (
        (self._num_leaves + indices) >> 1)
    for _ in range(self._depth):
      self._nodes[nodes] = self._nodes[2 * nodes] + self._nodes[2 * nodes + 1]
      nodes = nodes >> 1
      if nodes.size > 1:
        nodes = np.unique(nodes)

  def find_prefix_sum(self, targets) -> np.ndarray:
    """Index i with cumsum[i-1] <= target < cumsum[i] for each target (int64 array)."""
    targets = np.array(targets, dtype=np.float64, copy=True)
    # Top levels at once: searchsorted over the cumulative sums of one level's nodes (cheaper
    # than one numpy round per level), then descend the remaining levels.
    top = min(self._depth, _SEARCHSORTED_LEVEL)
    level = self._nodes[1 << top:2 << top]
    cumsum = np.cumsum(level)
    block = np.minimum(np.searchsorted(cumsum, targets, side='right'), level.size - 1)
    targets -= np.where(block > 0, cumsum[block - 1], 0.0)
    nodes = block + (1 << top)
    for _ in range(self._depth - top):
      left = 2 * nodes
      left_sum = self._nodes[left]
      go_right = targets >= left_sum
      targets -= left_sum * go_right
      nodes = left + go_right
    return np.minimum(nodes - self._num_leaves, self._capacity - 1)

  def sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """Stratified proportional sample of `batch_size` indices (int64)."""
    total = self.total()
    if total <= 0.0:
      raise ValueError('Cannot sample from a SumTree whose total is 0.')
    bounds = np.arange(batch_size, dtype=np.float64)
    targets = (bounds + rng.random(batch_size)) * (total / batch_size)
    indices = self.find_prefix_sum(np.minimum(targets, np.nextafter(total, 0.0)))
    # Float rounding can land on a zero leaf at a segment edge: redraw those uniformly.
    zero = self._nodes[self._num_leaves + indices] <= 0.0
    while np.any(zero):
      indices[zero] = self.find_prefix_sum(rng.random(int(zero.sum())) * total)
      zero = self._nodes[self._num_leaves + indices] <= 0.0
    return indices

  def check_valid(self) -> None:
    """Asserts every internal node equals the sum of its children and leaves are sane."""
    nodes = self._nodes
    assert nodes.shape == (2 * self._num_leaves,), nodes.shape
    leaves = nodes[self._num_leaves:]
    assert np.all(np.isfinite(leaves)), 'non-finite leaf'
    assert np.all(leaves >= 0.0), 'negative leaf'
    assert np.all(leaves[self._capacity:] == 0.0), 'padding leaf is non-zero'
    internal = np.arange(1, self._num_leaves)
    child_sums = nodes[2 * internal] + nodes[2 * internal + 1]
    assert np.allclose(nodes[internal], child_sums, rtol=1e-9, atol=1e-9), (
        'internal node differs from the sum of its children')
    assert self.max_recorded >= (leaves.max() if leaves.size else 0.0)

  def state_dict(self) -> dict:
    return {
        'capacity': np.int64(self._capacity),
        'nodes': self._nodes.copy(),
        'max_recorded': np.float64(self.max_recorded),
    }

  def load_state_dict(self, state: dict) -> None:
    capacity = int(state['capacity'])
    nodes = np.asarray(state['nodes'], dtype=np.float64)
    if capacity != self._capacity or nodes.shape != self._nodes.shape:
      raise ValueError(
          f'SumTree state has capacity {capacity} and {nodes.shape[0]} nodes; this tree has '
          f'capacity {self._capacity} and {self._nodes.shape[0]} nodes.')
    self._nodes[...] = nodes
    self.max_recorded = float(state['max_recorded'])

  def _check_indices(self, indices) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self._capacity):
      raise ValueError(
          f'SumTree indices must lie in [0, {self._capacity - 1}], got range '
          f'[{indices.min()}, {indices.max()}].')
    return indices
