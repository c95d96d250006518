"""SumTree against a brute-force numpy array, with check_valid() after every operation."""

import numpy as np
import pytest
from scipy import stats

from agents import sum_tree as sum_tree_lib


@pytest.mark.parametrize('capacity', [1, 2, 3, 7, 8, 100])
def test_random_set_get_total_match_brute_force(capacity):
  rng = np.random.default_rng(capacity)
  tree = sum_tree_lib.SumTree(capacity)
  reference = np.zeros(capacity)
  tree.check_valid()
  for _ in range(50):
    indices = rng.integers(0, capacity, rng.integers(1, 10))  # Duplicates are likely.
    values = rng.random(indices.size) * rng.choice([0.0, 1.0, 10.0])
    tree.set(indices, values)
    for i, v in zip(indices, values):  # Sequential writes: the last one wins.
      reference[i] = v
    tree.check_valid()
    np.testing.assert_allclose(tree.get(np.arange(capacity)), reference)
    np.testing.assert_allclose(tree.total(), reference.sum(), rtol=1e-12, atol=1e-12)
    assert tree.max_recorded >= reference.max()


def test_duplicate_indices_last_write_wins():
  tree = sum_tree_lib.SumTree(4)
  tree.set(np.array([2, 2, 2]), np.array([5.0, 1.0, 3.0]))
  tree.check_valid()
  assert tree.get(np.array([2]))[0] == 3.0
  assert tree.total() == 3.0
  assert tree.max_recorded == 3.0  # 5.0 was overwritten within the same call.


@pytest.mark.parametrize('capacity', [1, 5, 64, 1000, 5000, 70000])
def test_find_prefix_sum_matches_searchsorted(capacity):
  rng = np.random.default_rng(0)
  tree = sum_tree_lib.SumTree(capacity)
  # Integer values (some zero) keep every partial sum exact, so ties at segment
  # boundaries compare equal in both computations.
  values = rng.integers(0, 5, capacity).astype(np.float64)
  values[0] = max(values[0], 1.0)
  tree.set(np.arange(capacity), values)
  tree.check_valid()
  cumsum = np.cumsum(values)
  targets = rng.random(500) * tree.total()
  # Exact segment boundaries (ties go right, past zero-valued leaves).
  targets = np.concatenate([targets, cumsum[:-1], [0.0]])
  targets = targets[targets < tree.total()]
  found = tree.find_prefix_sum(targets)
  expected = np.searchsorted(cumsum, targets, side='right')
  np.testing.assert_array_equal(found, expected)
  assert np.all(values[found] > 0)


@pytest.mark.parametrize('capacity', [3, 5000])
def test_find_prefix_sum_with_float_values(capacity):
  rng = np.random.default_rng(capacity)
  tree = sum_tree_lib.SumTree(capacity)
  values = rng.random(capacity) * (rng.random(capacity) > 0.2)
  values[-1] = 0.5
  tree.set(np.arange(capacity), values)
  tree.check_valid()
  targets = rng.random(2000) * tree.total()
  found = tree.find_prefix_sum(targets)
  expected = np.searchsorted(np.cumsum(values), targets, side='right')
  # Float rounding may differ at segment boundaries only; targets there are measure-zero.
  assert np.mean(found == expected) > 0.999
  assert np.all(values[found] > 0)


def _leaf_intervals(values):
  """[start, end) of each leaf's share of the total mass."""
  ends = np.cumsum(values)
  return ends - values, ends


def test_sample_is_proportional_chi_square():
  rng = np.random.default_rng(1)
  tree = sum_tree_lib.SumTree(10)
  values = np.arange(10, dtype=float)  # Leaf 0 has priority 0.
  tree.set(np.arange(10), values)
  tree.check_valid()
  counts = np.zeros(10)
  for _ in range(4000):
    batch = tree.sample(rng, 5)
    assert batch.shape == (5,)
    np.add.at(counts, batch, 1)
  assert counts[0] == 0
  expected = counts.sum() * values[1:] / values.sum()
  # Stratification only lowers the variance, so the multinomial test is conservative.
  assert stats.chisquare(counts[1:], expected).pvalue > 1e-3


@pytest.mark.parametrize('batch_size', [1, 5, 7, 16])
def test_sample_draw_j_lands_in_the_jth_equal_slice_of_the_mass(batch_size):
  rng = np.random.default_rng(batch_size)
  values = np.array([0.5, 3.0, 0.0, 1.25, 7.0, 0.0, 0.2, 2.0, 4.5, 0.05, 1.5])
  tree = sum_tree_lib.SumTree(values.size)
  tree.set(np.arange(values.size), values)
  tree.check_valid()
  starts, ends = _leaf_intervals(values)
  total = values.sum()
  slice_starts = np.arange(batch_size) * total / batch_size
  slice_ends = (np.arange(batch_size) + 1) * total / batch_size
  eps = 1e-9 * total  # Float rounding of the slice edges only.
  counts = np.zeros((batch_size, values.size))
  for _ in range(3000):
    batch = tree.sample(rng, batch_size)
    assert batch.shape == (batch_size,)
    overlaps = (starts[batch] < slice_ends + eps) & (ends[batch] > slice_starts - eps)
    assert np.all(overlaps), (batch, np.flatnonzero(~overlaps))
    counts[np.arange(batch_size), batch] += 1
  assert np.all(counts[:, values == 0] == 0)
  # Within slice j a draw is proportional to the mass each leaf has inside the slice.
  for j in range(batch_size):
    inside = np.clip(np.minimum(ends, slice_ends[j]) - np.maximum(starts, slice_starts[j]),
                     0.0, None)
    assert np.all(counts[j, inside == 0] == 0)
    if np.count_nonzero(inside) > 1:
      expected = counts[j].sum() * inside[inside > 0] / inside.sum()
      assert stats.chisquare(counts[j, inside > 0], expected).pvalue > 1e-3, j


def test_state_dict_round_trip_and_errors():
  tree = sum_tree_lib.SumTree(6)
  tree.set(np.arange(6), np.arange(6) * 2.0)
  other = sum_tree_lib.SumTree(6)
  other.load_state_dict(tree.state_dict())
  other.check_valid()
  np.testing.assert_array_equal(other.get(np.arange(6)), tree.get(np.arange(6)))
  assert other.max_recorded == tree.max_recorded
  with pytest.raises(ValueError, match='capacity'):
    sum_tree_lib.SumTree(9).load_state_dict(tree.state_dict())
  with pytest.raises(ValueError, match='capacity'):
    sum_tree_lib.SumTree(0)
  with pytest.raises(ValueError, match='indices'):
    tree.set(np.array([6]), np.array([1.0]))
  with pytest.raises(ValueError, match='finite'):
    tree.set(np.array([0]), np.array([-1.0]))
  with pytest.raises(ValueError, match='total'):
    sum_tree_lib.SumTree(3).sample(np.random.default_rng(0), 2)


def test_check_valid_detects_corruption():
  tree = sum_tree_lib.SumTree(8)
  tree.set(np.arange(8), np.ones(8))
  tree._nodes[1] += 1.0  # pylint: disable=protected-access
  with pytest.raises(AssertionError):
    tree.check_valid()
