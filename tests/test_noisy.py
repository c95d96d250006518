"""Noisy layers beyond the head: full Rainbow's noisy penultimate layer and
noisy experts (networks.noisy), as in Dopamine's noisy networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from networks.experts import Experts
from networks.q_network import QNetwork, count_parameters

E, S, D, H = 3, 2, 4, 5


def _experts_params(key=0):
  x = jnp.zeros((2, E, S, D))
  params = Experts(E, H).init(
      jax.random.PRNGKey(key), x, noisy=True, deterministic=True)['params']
  return jax.tree_util.tree_map(np.asarray, params)


def test_noisy_experts_have_dopamine_sigma_on_the_first_layer_only():
  params = _experts_params()
  assert set(params) == {'w1', 'b1', 'w2', 'b2', 'w1_sigma', 'b1_sigma'}
  assert params['w1_sigma'].shape == (E, D, H) and params['b1_sigma'].shape == (E, H)
  for name in ('w1_sigma', 'b1_sigma'):  # 0.1 / sqrt(fan_in)
    np.testing.assert_allclose(params[name], 0.1 / np.sqrt(D), rtol=1e-6)


def test_noisy_experts_draw_factorised_noise_per_expert_shared_across_rows():
  params = _experts_params()
  params['b1'] = params['b1'] + 10.0  # keep every pre-activation positive
  params['w1_sigma'] = params['w1_sigma'] + np.abs(
      np.random.default_rng(0).normal(size=params['w1_sigma'].shape))
  layer = Experts(E, H)
  rngs = {'noise': jax.random.PRNGKey(7)}

  def hidden(x):
    _, h = layer.apply({'params': params}, jnp.asarray(x), noisy=True,
                       deterministic=False, rngs=rngs)
    return np.asarray(h)  # [B, E, S, H]

  rows = (2, E, S, D)
  # Zero input: b1 + b1_sigma * eps_out, the same for every row of an expert.
  eps_out = (hidden(np.zeros(rows)) - params['b1'][None, :, None]) / params['b1_sigma'][None, :, None]
  np.testing.assert_allclose(eps_out, np.broadcast_to(eps_out[:1, :, :1], eps_out.shape),
                             rtol=1e-5, atol=1e-6)
  eps_out = eps_out[0, :, 0]  # [E, H]
  assert not np.allclose(eps_out[0], eps_out[1])  # experts draw their own noise
  for i in range(D):  # unit input i: w1[e, i] + w1_sigma[e, i] * eps_in[e, i] * eps_out[e]
    x = np.zeros(rows)
    x[..., i] = 1.0
    noise = (hidden(x)[0, :, 0] - params['b1'] - params['b1_sigma'] * eps_out
             - params['w1'][:, i]) / params['w1_sigma'][:, i]  # [E, H]
    eps_in = noise / eps_out
    np.testing.assert_allclose(eps_in, eps_in[:, :1] * np.ones((1, H)), rtol=1e-3, atol=1e-4)
  # Deterministic (evaluation): the means only, whatever the noise key.
  _, det = layer.apply({'params': params}, jnp.ones(rows), noisy=True, deterministic=True)
  _, plain = layer.apply({'params': {k: params[k] for k in ('w1', 'b1', 'w2', 'b2')}},
                         jnp.ones(rows))
  np.testing.assert_allclose(det, plain, rtol=1e-6)


def _zero_sigmas(params, module):
  """`params` with every noise scale (sigma) of `module` set to zero."""
  def zero(path, x):
    keys = [str(k.key) for k in path]
    if keys[0] == module and any('sigma' in k for k in keys):
      return jnp.zeros_like(x)
    return x
  zeroed = jax.tree_util.tree_map_with_path(zero, params)
  assert not _leaves_equal(zeroed, params)  # there were sigmas to zero
  return zeroed


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize('penultimate', ['dense', 'softmoe', 'topk', 'expert_choice',
                                         'token_mlp'])
def test_noisy_network_penultimate_is_noisy_in_training_only(penultimate):
  net = QNetwork(num_actions=3, encoder='mlp', penultimate=penultimate, noisy=True,
                 num_atoms=5)
  obs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
  params = net.init({'params': jax.random.PRNGKey(0), 'noise': jax.random.PRNGKey(1)},
                    obs)['params']
  names = ['/'.join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(params['penultimate'])]
  assert any('sigma' in n for n in names), names
  # The head is noisy too, so Q-values that vary with the noise key prove
  # nothing about the penultimate: look at its own output (the features).
  def run(params, key, deterministic):
    out = net.apply({'params': params}, obs, deterministic=deterministic,
                    rngs={'noise': jax.random.PRNGKey(key)})
    return np.asarray(out.features), np.asarray(out.q_values)

  assert not np.allclose(run(params, 1, False)[0], run(params, 2, False)[0])
  np.testing.assert_array_equal(run(params, 1, True)[0], run(params, 2, True)[0])
  np.testing.assert_array_equal(run(params, 1, True)[1], run(params, 2, True)[1])
  np.testing.assert_array_equal(run(params, 3, False)[0], run(params, 3, False)[0])
  # The head's noise off (its sigmas zero), the penultimate's on: its own
  # noise moves the Q-values.
  quiet_head = _zero_sigmas(params, 'head')
  assert not np.allclose(run(quiet_head, 1, False)[1], run(quiet_head, 2, False)[1])
  # Control: the penultimate's sigmas zero as well, nothing moves any more, so
  # the variation above came from those sigmas and the noise they scale.
  quiet = _zero_sigmas(quiet_head, 'penultimate')
  for i in (0, 1):
    np.testing.assert_array_equal(run(quiet, 1, False)[i], run(quiet, 2, False)[i])
  # The penultimate's sigmas alone zero: its features stop moving, while the
  # head's noise still moves the Q-values.
  quiet_penultimate = _zero_sigmas(params, 'penultimate')
  np.testing.assert_array_equal(run(quiet_penultimate, 1, False)[0],
                                run(quiet_penultimate, 2, False)[0])
  assert not np.allclose(run(quiet_penultimate, 1, False)[1],
                         run(quiet_penultimate, 2, False)[1])


def test_rainbow_dense_baseline_has_dopamines_noisy_hidden_layer():
  """Dopamine's FullRainbowNetwork: a noisy Dense(512) on the Nature CNN's
  7744 features holds 2 x (7744 x 512 + 512) parameters."""
  net = QNetwork(num_actions=18, penultimate='dense', noisy=True, dueling=True,
                 num_atoms=51)
  obs = jnp.zeros((1, 84, 84, 4), jnp.uint8)
  params = jax.eval_shape(lambda: net.init(
      {'params': jax.random.PRNGKey(0), 'noise': jax.random.PRNGKey(1)}, obs))['params']
  assert count_parameters(params['penultimate']) == 2 * (7744 * 512 + 512)
