"""Tests for networks.soft_moe.SoftMoE (Puigcerver et al., 2024).

The reference below re-implements the paper's equations in float64 numpy from
the module's own parameters (phi, scale, experts w1/b1/w2/b2), one observation
at a time.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_testing import assert_no_mixing, fast_key, random_params, random_tokens
from networks.soft_moe import SoftMoE

B, T, D = 3, 10, 8


_key = fast_key


def _tokens(seed, shape=(B, T, D)):
  return random_tokens(100 + seed, shape)


def _softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def _np_experts(p, x):
  """x [E, S, d] -> expert_e(x[e, s]) for every slot, float64."""
  w1, b1 = np.asarray(p['w1'], np.float64), np.asarray(p['b1'], np.float64)
  w2, b2 = np.asarray(p['w2'], np.float64), np.asarray(p['b2'], np.float64)
  out = np.zeros_like(x)
  for e in range(x.shape[0]):
    h = np.maximum(x[e] @ w1[e] + b1[e], 0.0)
    out[e] = h @ w2[e] + b2[e]
  return out


def _np_soft_moe(params, tokens, normalization, expert_mask=None):
  """Reference outputs, dispatch and combine weights for a batch of tokens."""
  p = params['params']
  phi = np.asarray(p['phi'], np.float64)  # [d, E, S]
  d, e, s = phi.shape
  outs, dispatches, combines = [], [], []
  for x in np.asarray(tokens, np.float64):  # one observation [T, d]
    if normalization:
      xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
      phin = phi / np.linalg.norm(phi, axis=0, keepdims=True)
      logits = np.einsum('td,des->tes', xn, float(p['scale']) * phin)
    else:
      logits = np.einsum('td,des->tes', x, phi)
    dispatch = _softmax(logits, axis=0)  # over tokens
    combine = _softmax(logits.reshape(x.shape[0], e * s), axis=-1).reshape(
        logits.shape)  # over all (expert, slot) pairs
    slot_in = np.einsum('tes,td->esd', dispatch, x)  # D^T X
    slot_out = _np_experts(p['experts'], slot_in)
    if expert_mask is not None:
      slot_out = slot_out * expert_mask[:, None, None]
    outs.append(np.einsum('tes,esd->td', combine, slot_out))  # C Y~
    dispatches.append(dispatch)
    combines.append(combine)
  return np.stack(outs), np.stack(dispatches), np.stack(combines)


def _params(layer, tokens, seed=0, scale=2.5):
  """Random parameters in the layer's own tree (biases non-zero, scale != 1).

  Shapes come from jax.eval_shape (nothing is computed); values from numpy,
  so the reference checks every parameter, biases and scale included.
  """
  def fill(path, leaf):
    if path[-1].key == 'scale':
      return jnp.full(leaf.shape, scale, leaf.dtype)
    return None

  return random_params(layer, tokens, seed, std=0.4, fill=fill)


@functools.partial(jax.jit, static_argnames=('layer',))
def _apply(params, tokens, layer, expert_mask=None):
  kwargs = {} if expert_mask is None else {'expert_mask': expert_mask}
  return layer.apply(params, tokens, **kwargs)


@functools.partial(jax.jit, static_argnames=('layer',))
def _init(layer, tokens, seed=0):
  return layer.init(_key(seed), tokens)


@pytest.mark.parametrize('normalization', [False, True])
def test_weights_are_normalised_and_shaped(normalization):
  layer = SoftMoE(num_experts=3, expert_hidden_units=16,
                  normalization=normalization)
  x = _tokens(0)
  params = _params(layer, x)
  out, diag = _apply(params, x, layer)
  s = layer.num_slots(T)
  chex.assert_shape(out, (B, T, D))
  chex.assert_shape(diag['dispatch_weights'], (B, T, 3, s))
  chex.assert_shape(diag['combine_weights'], (B, T, 3, s))
  chex.assert_shape(diag['expert_hidden'], (B, 3, s, 16))
  chex.assert_shape(diag['aux_loss'], ())
  dispatch = np.asarray(diag['dispatch_weights'])
  combine = np.asarray(diag['combine_weights'])
  assert (dispatch >= 0).all() and (combine >= 0).all()
  # Every slot is a convex combination of the tokens of its own observation.
  np.testing.assert_allclose(dispatch.sum(axis=1), np.ones((B, 3, s)),
                             atol=1e-5)
  # Every token is a convex combination of all (expert, slot) outputs.
  np.testing.assert_allclose(combine.sum(axis=(2, 3)), np.ones((B, T)),
                             atol=1e-5)
  assert float(diag['aux_loss']) == 0.0


@pytest.mark.parametrize('normalization', [False, True])
@pytest.mark.parametrize('num_experts,capacity_factor,slots_per_expert',
                         [(3, 1.0, None), (4, 0.5, None), (2, 1.0, 3),
                          (1, 1.0, None)])
def test_matches_numpy_reference(normalization, num_experts, capacity_factor,
                                 slots_per_expert):
  layer = SoftMoE(num_experts=num_experts, expert_hidden_units=16,
                  capacity_factor=capacity_factor,
                  slots_per_expert=slots_per_expert,
                  normalization=normalization)
  x = _tokens(2)
  params = _params(layer, x)
  out, diag = _apply(params, x, layer)
  ref_out, ref_dispatch, ref_combine = _np_soft_moe(params, x, normalization)
  np.testing.assert_allclose(np.asarray(diag['dispatch_weights']),
                             ref_dispatch, atol=1e-5)
  np.testing.assert_allclose(np.asarray(diag['combine_weights']), ref_combine,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5)


def test_normalization_uses_learned_scale():
  layer = SoftMoE(num_experts=2, expert_hidden_units=8, normalization=True)
  x = _tokens(3)
  params = _init(layer, x)
  assert params['params']['scale'].shape == ()
  assert float(params['params']['scale']) == 1.0
  _, d1 = _apply(_params(layer, x, scale=1.0), x, layer)
  _, d2 = _apply(_params(layer, x, scale=4.0), x, layer)
  assert not np.allclose(d1['combine_weights'], d2['combine_weights'],
                         atol=1e-4)
  assert 'scale' not in _init(SoftMoE(num_experts=2, expert_hidden_units=8),
                              x)['params']


def test_expert_mask_removes_expert_outputs():
  layer = SoftMoE(num_experts=3, expert_hidden_units=8)
  x = _tokens(4)
  params = _params(layer, x)
  mask = np.array([1.0, 0.0, 1.0])
  out, _ = _apply(params, x, layer, expert_mask=jnp.tile(mask, (B, 1)))
  ref_out, _, _ = _np_soft_moe(params, x, False, expert_mask=mask)
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5)
  full, _ = _apply(params, x, layer)
  assert not np.allclose(out, full, atol=1e-4)


@pytest.mark.parametrize('normalization', [False, True])
def test_token_permutation_permutes_output(normalization):
  layer = SoftMoE(num_experts=3, expert_hidden_units=16,
                  normalization=normalization)
  x = _tokens(5)
  params = _params(layer, x)
  perm = np.random.default_rng(9).permutation(T)
  assert (perm != np.arange(T)).any()
  out, diag = _apply(params, x, layer)
  out_p, diag_p = _apply(params, x[:, perm], layer)
  np.testing.assert_allclose(np.asarray(out_p), np.asarray(out)[:, perm],
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(diag_p['dispatch_weights']),
                             np.asarray(diag['dispatch_weights'])[:, perm],
                             atol=1e-6)


def test_normalized_routing_is_invariant_to_token_scale():
  x = _tokens(6)
  for normalization in (True, False):
    layer = SoftMoE(num_experts=3, expert_hidden_units=8,
                    normalization=normalization)
    params = _params(layer, x)
    _, diag = _apply(params, x, layer)
    changed = []
    for c in (0.2, 3.7):
      _, diag_c = _apply(params, c * x, layer)
      for name in ('dispatch_weights', 'combine_weights'):
        same = np.allclose(diag_c[name], diag[name], atol=1e-5)
        if normalization:
          np.testing.assert_allclose(np.asarray(diag_c[name]),
                                     np.asarray(diag[name]), atol=1e-5)
        changed.append(not same)
    if not normalization:
      # Sanity: without normalisation the routing does depend on the scale.
      assert all(changed)


@pytest.mark.parametrize(
    'num_tokens,num_experts,capacity_factor,slots_per_expert,expected',
    [(121, 8, 1.0, None, 16),  # Dopamine: ceil(121 / 8)
     (12, 4, 1.0, None, 3),
     (10, 4, 1.0, None, 3),  # ceil(2.5)
     (10, 4, 0.5, None, 2),  # ceil(1.25)
     (7, 2, 2.0, None, 7),
     (6, 4, 0.1, None, 1),  # ceil(0.15)
     (10, 4, 1.0, 5, 5),  # explicit slots_per_expert wins
     (10, 4, 3.0, 1, 1)])
def test_slot_count_rule(num_tokens, num_experts, capacity_factor,
                         slots_per_expert, expected):
  layer = SoftMoE(num_experts=num_experts, expert_hidden_units=4,
                  capacity_factor=capacity_factor,
                  slots_per_expert=slots_per_expert)
  assert layer.num_slots(num_tokens) == expected
  if slots_per_expert is None:
    assert expected == math.ceil(capacity_factor * num_tokens / num_experts)
  x = jax.ShapeDtypeStruct((1, num_tokens, 4), jnp.float32)
  shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
  assert shapes['params']['phi'].shape == (4, num_experts, expected)


def test_experts_start_distinct():
  layer = SoftMoE(num_experts=4, expert_hidden_units=8)
  params = _init(layer, _tokens(7))['params']['experts']
  for name in ('w1', 'w2'):
    w = np.asarray(params[name])
    for i in range(4):
      for j in range(i + 1, 4):
        assert not np.allclose(w[i], w[j])


def test_no_mixing_across_observations():
  layer = SoftMoE(num_experts=3, expert_hidden_units=8)
  x = _tokens(8)
  params = _params(layer, x)
  assert_no_mixing(lambda tokens: _apply(params, tokens, layer)[0], x,
                   5.0 * _tokens(9))


@pytest.mark.parametrize('kwargs,named', [
    (dict(num_experts=0), 'num_experts=0'),
    (dict(num_experts=-2), 'num_experts=-2'),
    (dict(capacity_factor=0.0), 'capacity_factor=0.0'),
    (dict(capacity_factor=-1.5), 'capacity_factor=-1.5'),
    (dict(expert_hidden_units=0), 'expert_hidden_units=0'),
    (dict(slots_per_expert=0), 'slots_per_expert=0'),
])
def test_rejects_bad_options(kwargs, named):
  with pytest.raises(ValueError, match=named):
    SoftMoE(**kwargs)


def test_phi_initialisation_is_dopamines_lecun_normal():
  """Dopamine's SoftMoE draws phi [d, E, S] with lecun_normal: std 1/sqrt(E d)."""
  d, experts = 64, 8
  tokens = jnp.zeros((1, 121, d))
  params = SoftMoE(num_experts=experts, expert_hidden_units=4).init(
      jax.random.PRNGKey(0), tokens)['params']
  phi = np.asarray(params['phi'])
  assert phi.shape == (d, experts, 16)
  expected = (experts * d) ** -0.5
  assert abs(phi.std() - expected) < 0.05 * expected
  assert np.abs(phi).max() <= 2.0 * expected / 0.87962566 + 1e-6  # truncated at 2 std
