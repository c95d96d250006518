"""Tests for networks.heads (linear, dueling, C51, noisy) and the head part of
QNetwork (probabilities and expected Q-values over the C51 support)."""

import functools

import chex
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from networks.heads import QHead
from networks.noisy import NoisyDense
from networks.q_network import QNetwork

B, F = 4, 12


def _key(seed):
  """A PRNG key whose bit generator compiles fast on CPU (threefry does not)."""
  return jax.random.key(seed, impl='unsafe_rbg')


def _features(seed, shape=(B, F)):
  rng = np.random.default_rng(400 + seed)
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _params(module, x, seed=0, **kwargs):
  """Random parameters in the module's own tree (biases, sigmas non-zero)."""
  shapes = jax.eval_shape(
      functools.partial(module.init, **kwargs), _key(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype),
      shapes)


@functools.partial(jax.jit, static_argnames=('module', 'deterministic'))
def _apply(params, x, module, deterministic=True, rngs=None):
  return module.apply(params, x, deterministic=deterministic, rngs=rngs)


def _np(x):
  return np.asarray(x, np.float64)


@pytest.mark.parametrize('num_atoms', [1, 3])
def test_linear_head(num_atoms):
  head = QHead(num_actions=5, num_atoms=num_atoms)
  x = _features(0)
  params = _params(head, x)
  assert set(params['params']) == {'q'}
  out = _apply(params, x, head)
  chex.assert_shape(out, (B, 5, num_atoms))
  q = params['params']['q']
  ref = (_np(x) @ _np(q['kernel']) + _np(q['bias'])).reshape(B, 5, num_atoms)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.parametrize('num_atoms', [1, 3])
def test_dueling_combines_value_and_mean_centred_advantage(num_atoms):
  head = QHead(num_actions=5, num_atoms=num_atoms, dueling=True)
  x = _features(1)
  params = _params(head, x)
  p = params['params']
  assert set(p) == {'advantage', 'value'}
  out = np.asarray(_apply(params, x, head))
  chex.assert_shape(out, (B, 5, num_atoms))
  adv = (_np(x) @ _np(p['advantage']['kernel']) +
         _np(p['advantage']['bias'])).reshape(B, 5, num_atoms)
  value = (_np(x) @ _np(p['value']['kernel']) +
           _np(p['value']['bias'])).reshape(B, 1, num_atoms)
  ref = value + adv - adv.mean(axis=1, keepdims=True)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # The mean over actions recovers the value stream.
  np.testing.assert_allclose(out.mean(axis=1), value[:, 0], atol=1e-5)


def _c51_network(dueling):
  gin.bind_parameter('MLPEncoder.hidden_units', (16,))
  return QNetwork(num_actions=3, encoder='mlp', penultimate='gap',
                  num_atoms=51, v_min=-5.0, v_max=7.0, dueling=dueling)


@pytest.mark.parametrize('dueling', [False, True])
def test_c51_probabilities_and_expected_q(dueling):
  net = _c51_network(dueling)
  obs = _features(2, (B, 5))
  params = _params(net, obs)
  out = _apply(params, obs, net)
  chex.assert_shape(out.logits, (B, 3, 51))
  chex.assert_shape(out.probabilities, (B, 3, 51))
  chex.assert_shape(out.q_values, (B, 3))
  probs = np.asarray(out.probabilities, np.float64)
  assert (probs >= 0).all()
  np.testing.assert_allclose(probs.sum(-1), np.ones((B, 3)), atol=1e-5)
  logits = _np(out.logits)
  ref_probs = np.exp(logits - logits.max(-1, keepdims=True))
  ref_probs /= ref_probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(probs, ref_probs, atol=1e-6)
  support = np.linspace(-5.0, 7.0, 51)
  np.testing.assert_allclose(np.asarray(net.support), support, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.q_values),
                             (probs * support).sum(-1), atol=1e-4)
  # The logits are the head applied to the reported features.
  head = params['params']['head']
  feats = _np(out.features)
  if dueling:
    adv = (feats @ _np(head['advantage']['kernel']) +
           _np(head['advantage']['bias'])).reshape(B, 3, 51)
    val = (feats @ _np(head['value']['kernel']) +
           _np(head['value']['bias'])).reshape(B, 1, 51)
    ref_logits = val + adv - adv.mean(1, keepdims=True)
  else:
    ref_logits = (feats @ _np(head['q']['kernel']) +
                  _np(head['q']['bias'])).reshape(B, 3, 51)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4)


def test_single_atom_q_values_are_the_logits():
  gin.bind_parameter('MLPEncoder.hidden_units', (16,))
  net = QNetwork(num_actions=3, encoder='mlp', penultimate='gap')
  obs = _features(3, (B, 5))
  out = _apply(_params(net, obs), obs, net)
  np.testing.assert_array_equal(np.asarray(out.q_values),
                                np.asarray(out.logits[..., 0]))
  np.testing.assert_array_equal(np.asarray(out.probabilities),
                                np.ones((B, 3, 1)))
  np.testing.assert_array_equal(np.asarray(net.support), np.zeros(1))


def test_noisy_parameter_names():
  x = _features(4)
  layer = NoisyDense(7)
  shapes = jax.eval_shape(
      functools.partial(layer.init, deterministic=True), _key(0),
      x)['params']
  assert {k: v.shape for k, v in shapes.items()} == {
      'kernel_mu': (F, 7), 'kernel_sigma': (F, 7), 'bias_mu': (7,),
      'bias_sigma': (7,)}
  head = QHead(num_actions=3, num_atoms=2, dueling=True, noisy=True)
  shapes = jax.eval_shape(
      functools.partial(head.init, deterministic=True), _key(0),
      x)['params']
  for stream, size in (('advantage', 6), ('value', 2)):
    assert set(shapes[stream]) == {'kernel_mu', 'kernel_sigma', 'bias_mu',
                                   'bias_sigma'}
    assert shapes[stream]['kernel_sigma'].shape == (F, size)


def test_noisy_initialisation():
  x = _features(5)
  params = jax.jit(functools.partial(NoisyDense(7).init, deterministic=True))(
      _key(0), x)['params']
  bound = F ** -0.5
  for name in ('kernel_mu', 'bias_mu'):
    assert np.abs(np.asarray(params[name])).max() <= bound
    assert np.std(np.asarray(params[name])) > 0
  for name in ('kernel_sigma', 'bias_sigma'):  # Dopamine: 0.1 / sqrt(fan_in)
    np.testing.assert_allclose(np.asarray(params[name]), 0.1 * bound,
                               rtol=1e-6)


def test_noisy_deterministic_uses_means_only():
  layer = NoisyDense(7)
  x = _features(6)
  params = _params(layer, x, deterministic=True)
  p = params['params']
  ref = _np(x) @ _np(p['kernel_mu']) + _np(p['bias_mu'])
  outs = [_apply(params, x, layer, deterministic=True),
          _apply(params, x, layer, deterministic=True,
                 rngs={'noise': _key(1)}),
          _apply(params, x, layer, deterministic=True,
                 rngs={'noise': _key(2)})]
  for out in outs:
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_noisy_training_noise_is_factorised_and_shared_across_batch():
  layer = NoisyDense(5)
  n = 6
  # Row 0: zeros; rows 1..n: unit vectors; rows n+1, n+2: the same vector.
  same = np.random.default_rng(0).standard_normal(n)
  x = jnp.asarray(np.vstack([np.zeros(n), np.eye(n), same, same]),
                  jnp.float32)
  params = _params(layer, x, deterministic=True)
  # Sigmas well away from zero so that the noise can be read back exactly.
  params = {'params': dict(
      params['params'],
      kernel_sigma=0.3 + jnp.abs(params['params']['kernel_sigma']),
      bias_sigma=0.3 + jnp.abs(params['params']['bias_sigma']))}
  p = {k: _np(v) for k, v in params['params'].items()}
  k1, k2 = _key(1), _key(2)
  out1 = _np(_apply(params, x, layer, deterministic=False, rngs={'noise': k1}))
  out1b = _np(_apply(params, x, layer, deterministic=False,
                     rngs={'noise': k1}))
  out2 = _np(_apply(params, x, layer, deterministic=False, rngs={'noise': k2}))
  np.testing.assert_array_equal(out1, out1b)  # same key, same noise
  assert not np.allclose(out1, out2, atol=1e-4)  # another key, other noise
  mean = _np(x) @ p['kernel_mu'] + p['bias_mu']
  assert not np.allclose(out1, mean, atol=1e-4)
  # One noise sample for the whole batch: identical rows, identical outputs.
  np.testing.assert_allclose(out1[n + 1], out1[n + 2], atol=1e-6)
  # Zero input: b_mu + b_sigma * eps_out.
  eps_out = (out1[0] - p['bias_mu']) / p['bias_sigma']
  # Unit vector i: the noisy weight row i = mu_i + sigma_i * eps_in_i * eps_out.
  noise = (out1[1:n + 1] - p['kernel_mu'] - p['bias_mu'] -
           p['bias_sigma'] * eps_out) / p['kernel_sigma']  # [n, 5]
  j = np.argmax(np.abs(eps_out))
  eps_in = noise[:, j] / eps_out[j]
  np.testing.assert_allclose(noise, np.outer(eps_in, eps_out), atol=1e-4)
  # f(x) = sign(x) sqrt|x| of a standard normal is not degenerate.
  assert np.abs(eps_in).max() > 1e-3 and np.abs(eps_out).max() > 1e-3


def test_noisy_network_gradients_reach_every_parameter():
  gin.bind_parameter('MLPEncoder.hidden_units', (16,))
  net = QNetwork(num_actions=3, encoder='mlp', penultimate='gap', noisy=True,
                 dueling=True)
  obs = _features(7, (B, 5))
  params = jax.jit(functools.partial(net.init, deterministic=True))(
      _key(0), obs)

  def loss(p):
    out = net.apply(p, obs, deterministic=False,
                    rngs={'noise': _key(3)})
    return jnp.sum(out.q_values ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  assert any('kernel_sigma' in n for n in names)
  for name, (_, g) in zip(names, flat):
    g = np.asarray(g)
    assert np.isfinite(g).all(), name
    assert (g != 0).any(), name
  # Evaluation mode needs no rng and ignores the noise.
  q_eval = _apply(params, obs, net).q_values
  q_eval2 = _apply(params, obs, net,
                   rngs={'noise': _key(5)}).q_values
  np.testing.assert_array_equal(np.asarray(q_eval), np.asarray(q_eval2))
