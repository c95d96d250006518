"""Helpers shared by test modules: MoE layers, and trees of arrays compared leaf by leaf."""

import jax
import jax.numpy as jnp
import numpy as np


def assert_trees_equal(a, b):
  """Same structure, and every leaf the same dtype and values."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def fast_key(seed):
  """A PRNG key whose bit generator compiles fast on CPU (threefry does not)."""
  return jax.random.key(seed, impl='unsafe_rbg')


def random_tokens(seed, shape):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def random_params(layer, tokens, seed=0, std=0.5, fill=None):
  """Random parameters in the layer's own tree (biases non-zero).

  Shapes come from jax.eval_shape (nothing is computed); values from numpy.
  `fill(path, leaf)` may return a value for a leaf, or None for the default.
  """
  shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), tokens)
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    special = fill(path, leaf) if fill is not None else None
    if special is not None:
      return special
    return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, shapes)


def assert_no_mixing(outputs_of, x, other):
  """Changing some observations of a batch never moves the others' outputs.

  `outputs_of(tokens) -> outputs [B, ...]`. Every observation but the first
  is changed, then only the first (routing, capacity and priority must be
  per observation).
  """
  out = np.asarray(outputs_of(x))
  batch = x.shape[0]
  for changed in (slice(1, None), slice(0, 1)):
    out_y = np.asarray(outputs_of(x.at[changed].set(other[changed])))
    kept = np.ones(batch, bool)
    kept[changed] = False
    assert not np.allclose(out_y[~kept], out[~kept], atol=1e-4)
    np.testing.assert_allclose(out_y[kept], out[kept], atol=1e-6)
