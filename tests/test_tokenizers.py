"""Tests for networks.tokenizers: token shapes and values, and rejection of bad settings.

Token values are checked against plain numpy indexing of the documented order:
per_conv token h * W + w is the C features at (h, w); per_feat token c is
feature map c flattened row-major; per_patch token i * W' + j is the patch at
patch row i, patch column j, flattened (row, column, channel) and embedded by
the conv kernel and bias.

Bad settings raise ValueError naming the gin parameter: the settings alone when
the tokenizer is built, the patch grid against the feature map when traced
(shapes only, through jax.eval_shape). `moerl train` turns them into one line
and exit code 2.
"""

import contextlib
import io
import os
import re

import chex
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cli import main
from networks.q_network import QNetwork
from networks.tokenizers import PerConv, PerFeat, PerPatch


def _shape_of(module, shape):
  """Output shape of `module` on a float32 input of `shape`, computed nothing."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  return jax.eval_shape(module.apply, variables, x).shape


def test_token_shapes():
  chex.assert_equal(_shape_of(PerConv(), (2, 11, 11, 64)), (2, 121, 64))
  chex.assert_equal(_shape_of(PerFeat(), (2, 11, 11, 64)), (2, 64, 121))
  patch = PerPatch(patch_size=(3, 4), embedding_dim=8)
  chex.assert_equal(_shape_of(patch, (2, 11, 11, 64)), (2, 3 * 2, 8))
  chex.assert_equal(_shape_of(patch, (2, 3, 4, 64)), (2, 1, 8))


def _random_map(shape, seed=0):
  """A float32 feature map of `shape` with distinct random values."""
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _apply(module, x, seed=0):
  variables = module.init(jax.random.PRNGKey(seed), jnp.asarray(x))
  return variables, np.asarray(module.apply(variables, jnp.asarray(x)))


def test_per_conv_token_h_times_w_plus_w_holds_the_features_at_h_w():
  x = _random_map((3, 5, 7, 4))  # H != W: swapping the two axes would show.
  _, tokens = _apply(PerConv(), x)
  assert tokens.shape == (3, 5 * 7, 4)
  for h in range(5):
    for w in range(7):
      np.testing.assert_array_equal(tokens[:, h * 7 + w, :], x[:, h, w, :])


def test_per_feat_token_c_is_feature_map_c_flattened_row_major():
  x = _random_map((3, 5, 7, 4), seed=1)
  _, tokens = _apply(PerFeat(), x)
  assert tokens.shape == (3, 4, 5 * 7)
  for c in range(4):
    for h in range(5):
      for w in range(7):
        np.testing.assert_array_equal(tokens[:, c, h * 7 + w], x[:, h, w, c])


@pytest.mark.parametrize('shape,patch_size', [
    ((2, 11, 11, 6), (3, 4)),  # 3 x 2 patches; the last rows and columns are dropped.
    ((3, 6, 9, 2), (2, 3)),  # 3 x 3 patches that tile the map exactly.
    ((2, 4, 5, 3), (4, 5)),  # One patch: the whole map.
])
def test_per_patch_tokens_are_embedded_patches_in_row_major_order(shape, patch_size):
  x = _random_map(shape, seed=2)
  module = PerPatch(patch_size=patch_size, embedding_dim=5)
  variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
  # The bias initialises to zero; a random one checks that it is added once per token.
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  (conv,) = params.values()
  kernel = conv['kernel'].astype(np.float64)
  bias = np.random.default_rng(3).normal(size=conv['bias'].shape)
  conv['bias'] = bias.astype(np.float32)
  tokens = np.asarray(module.apply({'params': params}, jnp.asarray(x)))
  b, h, w, c = shape
  ph, pw = patch_size
  assert kernel.shape == (ph, pw, c, 5)
  rows, cols = h // ph, w // pw
  assert tokens.shape == (b, rows * cols, 5)
  weights = kernel.reshape(ph * pw * c, 5)  # Rows in (patch row, patch column, channel) order.
  for i in range(rows):
    for j in range(cols):
      patch = x[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw, :].astype(np.float64)
      expected = patch.reshape(b, ph * pw * c) @ weights + bias
      np.testing.assert_allclose(tokens[:, i * cols + j], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tokenizer', [
    PerConv(), PerFeat(), PerPatch(patch_size=(2, 3), embedding_dim=4)])
def test_tokens_of_one_sample_do_not_depend_on_the_rest_of_the_batch(tokenizer):
  x = _random_map((4, 6, 6, 3), seed=4)
  variables, tokens = _apply(tokenizer, x)
  for i in range(4):
    alone = np.asarray(tokenizer.apply(variables, jnp.asarray(x[i:i + 1])))
    np.testing.assert_allclose(alone[0], tokens[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('binding,named', [
    ('PerPatch.patch_size = (0, 0)', 'PerPatch.patch_size=(0, 0)'),
    ('PerPatch.patch_size = (3, -1)', 'PerPatch.patch_size=(3, -1)'),
    ('PerPatch.patch_size = 3', 'PerPatch.patch_size=3'),
    ('PerPatch.patch_size = (3, 3, 3)', 'PerPatch.patch_size=(3, 3, 3)'),
    ('PerPatch.embedding_dim = 0', 'PerPatch.embedding_dim=0'),
])
def test_bad_per_patch_settings_are_rejected_when_built(binding, named):
  gin.parse_config(binding)
  with pytest.raises(ValueError, match=re.escape(named)):
    QNetwork(num_actions=3, tokenizer='per_patch')


@pytest.mark.parametrize('patch_size', [(20, 20), (3, 12), (12, 3)])
def test_patches_larger_than_the_feature_map_are_rejected(patch_size):
  gin.parse_config(f'PerPatch.patch_size = {patch_size}')
  net = QNetwork(num_actions=3, tokenizer='per_patch')  # Nature CNN: 11x11.
  with pytest.raises(ValueError) as raised:
    jax.eval_shape(net.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 84, 84, 4), jnp.uint8))
  message = str(raised.value)
  assert f'PerPatch.patch_size={patch_size}' in message
  assert '(1, 11, 11, 64)' in message


@pytest.mark.parametrize('tokenizer', [PerConv, PerFeat, PerPatch])
def test_empty_feature_maps_are_rejected(tokenizer):
  with pytest.raises(ValueError, match=rf'{tokenizer.__name__} .*\(2, 0, 5, 8\)'):
    _shape_of(tokenizer(), (2, 0, 5, 8))


def test_cli_refuses_a_patch_grid_larger_than_the_map(tmp_path):
  # The CartPole MLP encoder gives a 1x8 map: no 3x3 patch fits.
  base_dir = str(tmp_path / 'run')
  err = io.StringIO()
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    code = main(['train', '--base_dir', base_dir,
                 '--gin_files', 'cartpole_dqn_softmoe.gin',
                 '--gin_bindings', "QNetwork.tokenizer = 'per_patch'"])
  lines = err.getvalue().strip().splitlines()
  assert code == 2, err.getvalue()
  assert len(lines) == 1 and lines[0].startswith('moerl: error:'), lines
  assert 'PerPatch.patch_size=(3, 3)' in lines[0]
  assert not os.path.exists(base_dir)
