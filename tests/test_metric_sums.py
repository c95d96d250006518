"""MetricSums: queued, chunked sums equal the plain weighted sums, in order."""

import jax.numpy as jnp
import numpy as np
import pytest

from agents import metric_sums
from agents.metric_sums import MetricSums


def _entries(count, seeds=None, seed=0):
  rng = np.random.default_rng(seed)
  lead = () if seeds is None else (seeds,)
  return [{'loss': rng.normal(size=lead).astype(np.float32),
           'share': rng.normal(size=lead + (3,)).astype(np.float32)}
          for _ in range(count)]


@pytest.mark.parametrize('count', [1, metric_sums.CHUNK, 2 * metric_sums.CHUNK + 5])
def test_one_agent_sums_equal_a_sequential_fold(count):
  entries = _entries(count)
  weights = [1 + i % 3 for i in range(count)]  # fused steps count K times
  sums = MetricSums()
  for entry, w in zip(entries, weights):
    sums.add({k: jnp.asarray(v) for k, v in entry.items()}, w)
  got, total, latest = sums.pop()
  assert total == sum(weights) and latest is None
  for key in ('loss', 'share'):
    expected = np.zeros_like(entries[0][key])
    for entry, w in zip(entries, weights):  # float32, in step order
      expected = expected + np.float32(w) * entry[key]
    np.testing.assert_allclose(got[key], expected, rtol=1e-6, atol=1e-6)
  assert sums.pop() is None  # cleared


def test_per_seed_weights_mask_seeds_and_keep_each_seeds_latest():
  count, seeds = metric_sums.CHUNK + 3, 3
  entries = _entries(count, seeds)
  rng = np.random.default_rng(1)
  masks = rng.random((count, seeds)) < 0.5
  masks[:, 2] = False  # seed 2 never updates
  masks[0, 0] = masks[-1, 1] = True
  grams = [rng.normal(size=(seeds, 2, 2)).astype(np.float32) for _ in range(count)]
  sums = MetricSums()
  for entry, mask, gram in zip(entries, masks, grams):
    sums.add(entry, mask, latest=gram)
  np.testing.assert_array_equal(sums.total, masks.sum(0))
  for j in range(2):
    part = sums.seed(j).pop()
    assert part is not None
    got, total, latest = part
    assert total == masks[:, j].sum()
    expected = sum(e['loss'][j] for e, m in zip(entries, masks) if m[j])
    np.testing.assert_allclose(got['loss'], expected, rtol=1e-5)
    newest = max(i for i in range(count) if masks[i, j])
    np.testing.assert_array_equal(latest, grams[newest][j])
  assert sums.seed(2).pop() is None  # no update: nothing to report


def test_zero_weight_padding_does_not_change_sums():
  entries = _entries(3)
  sums = MetricSums()
  for entry in entries:
    sums.add(entry, 0)
  assert sums.pop() is None
  sums.add(entries[0], 1)
  got, total, _ = sums.pop()
  assert total == 1
  np.testing.assert_allclose(got['loss'], entries[0]['loss'])
