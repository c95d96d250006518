"""Tests for networks.tokenizers: token shapes and rejection of bad settings.

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
