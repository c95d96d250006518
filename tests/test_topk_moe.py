"""Tests for networks.topk_moe.TopKMoE (tokens choose their top-k experts).

The numpy reference follows the module docstring literally, one observation at
a time: router probabilities, top-k with gates, per-expert buffers of
ceil(capacity_factor * T * k / E) slots filled in priority order (all first
choices in token order, then all second choices, ...), and the overflow policy.
"""

import functools
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_testing import assert_no_mixing, fast_key, random_params, random_tokens
from networks.topk_moe import TopKMoE

B, T, D, H = 2, 8, 6, 8


_key = fast_key


def _tokens(seed, shape=(B, T, D)):
  return random_tokens(200 + seed, shape)


def _params(layer, tokens, seed=0):
  return random_params(layer, tokens, seed)


def _with_router(params, kernel, bias):
  inner = dict(params['params'])
  inner['router'] = {'kernel': jnp.asarray(kernel, jnp.float32),
                     'bias': jnp.asarray(bias, jnp.float32)}
  return {'params': inner}


@functools.partial(jax.jit, static_argnames=('layer', 'deterministic'))
def _apply(params, tokens, layer, deterministic=True, rngs=None):
  return layer.apply(params, tokens, deterministic=deterministic, rngs=rngs)


def _softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _np_expert(p, e, x):
  w1, b1 = np.asarray(p['w1'], np.float64), np.asarray(p['b1'], np.float64)
  w2, b2 = np.asarray(p['w2'], np.float64), np.asarray(p['b2'], np.float64)
  return np.maximum(x @ w1[e] + b1[e], 0.0) @ w2[e] + b2[e]


def _np_router(params, tokens):
  r = params['params']['router']
  logits = (np.asarray(tokens, np.float64) @ np.asarray(r['kernel'], np.float64)
            + np.asarray(r['bias'], np.float64))
  return logits, _softmax(logits)


def _np_topk(params, tokens, k, capacity, overflow, normalize_gates=False):
  """Reference outputs [B, T, d] and the number of overflowed assignments."""
  experts = params['params']['experts']
  _, probs = _np_router(params, tokens)
  x = np.asarray(tokens, np.float64)
  out = np.zeros_like(x)
  overflowed = 0
  for b in range(x.shape[0]):
    # Stable argsort: ties go to the lower expert index, like lax.top_k.
    choice = np.argsort(-probs[b], axis=-1, kind='stable')[:, :k]  # [T, k]
    gates = np.take_along_axis(probs[b], choice, axis=-1)
    if normalize_gates:
      gates = gates / gates.sum(-1, keepdims=True)
    load = np.zeros(probs.shape[-1], int)
    for j in range(k):  # priority: all j-th choices before any (j+1)-th
      for t in range(x.shape[1]):  # then token order
        e, g = choice[t, j], gates[t, j]
        if load[e] < capacity:
          load[e] += 1
          out[b, t] += g * _np_expert(experts, e, x[b, t])
        else:
          overflowed += 1
          if overflow == 'pass_through':
            out[b, t] += g * x[b, t]
  return out, overflowed


@pytest.mark.parametrize('k,normalize_gates', [(1, False), (2, False),
                                               (4, False), (2, True)])
def test_no_overflow_is_gate_weighted_sum_of_top_k_experts(k, normalize_gates):
  e = 4
  layer = TopKMoE(num_experts=e, k=k, expert_hidden_units=H,
                  capacity_factor=float(e), normalize_gates=normalize_gates)
  x = _tokens(0)
  params = _params(layer, x)
  out, diag = _apply(params, x, layer)
  assert layer.capacity(T) >= T  # every expert can take every token
  assert float(diag['dropped_fraction']) == 0.0
  # Direct formula, no buffers at all: sum over the top-k of gate * expert.
  _, probs = _np_router(params, x)
  ref = np.zeros(x.shape)
  for b in range(B):
    for t in range(T):
      top = np.argsort(-probs[b, t])[:k]
      gates = probs[b, t, top]
      if normalize_gates:
        gates = gates / gates.sum()
      for e_, g in zip(top, gates):
        ref[b, t] += g * _np_expert(params['params']['experts'], e_,
                                    np.asarray(x[b, t], np.float64))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(diag['router_probs']), probs,
                             atol=1e-6)
  # Each token is dispatched to exactly k experts.
  np.testing.assert_array_equal(
      np.asarray(diag['dispatch_mask']).sum(axis=(2, 3)), np.full((B, T), k))


@pytest.mark.parametrize('overflow', ['drop', 'pass_through'])
@pytest.mark.parametrize('k,capacity_factor', [(1, 0.5), (2, 0.5),
                                               (3, 0.25)])
def test_overflow_matches_reference(overflow, k, capacity_factor):
  e = 4
  layer = TopKMoE(num_experts=e, k=k, expert_hidden_units=H,
                  capacity_factor=capacity_factor, overflow=overflow)
  x = _tokens(1)
  params = _params(layer, x, seed=1)
  # Bias the router towards expert 0 so overflow certainly happens.
  r = params['params']['router']
  params = _with_router(params, r['kernel'], np.array([1.5, 0.5, 0.0, -0.5]))
  c = layer.capacity(T)
  assert c == math.ceil(capacity_factor * T * k / e)
  out, diag = _apply(params, x, layer)
  ref, overflowed = _np_topk(params, x, k, c, overflow)
  assert overflowed > 0  # the case really exercises the overflow path
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  np.testing.assert_allclose(float(diag['dropped_fraction']),
                             overflowed / (B * T * k), atol=1e-7)
  dispatch = np.asarray(diag['dispatch_mask'])  # [B, T, E, C]
  chex.assert_shape(dispatch, (B, T, e, c))
  assert set(np.unique(dispatch)) <= {0.0, 1.0}
  assert (dispatch.sum(axis=1) <= 1).all()  # a slot holds at most one token
  np.testing.assert_allclose(dispatch.sum(), B * T * k - overflowed)


def _all_pick_expert_zero(overflow, num_tokens=6):
  """Router forced so every token's first choice is expert 0; capacity 2."""
  e = 3
  layer = TopKMoE(num_experts=e, k=1, expert_hidden_units=H,
                  capacity_factor=1.0, overflow=overflow)
  x = _tokens(2, (1, num_tokens, D))
  params = _params(layer, x, seed=2)
  params = _with_router(params, np.zeros((D, e)), [3.0, 0.0, 0.0])
  return layer, params, x


@pytest.mark.parametrize('overflow', ['drop', 'pass_through'])
def test_overflow_policy_and_token_priority(overflow):
  layer, params, x = _all_pick_expert_zero(overflow)
  assert layer.capacity(6) == 2
  out, diag = _apply(params, x, layer)
  out, xs = np.asarray(out[0], np.float64), np.asarray(x[0], np.float64)
  gate = np.exp(3.0) / (np.exp(3.0) + 2.0)
  experts = params['params']['experts']
  # Earlier tokens keep their slots in expert 0's buffer.
  for t in (0, 1):
    np.testing.assert_allclose(out[t], gate * _np_expert(experts, 0, xs[t]),
                               atol=1e-5)
  # Later tokens overflow.
  for t in range(2, 6):
    expected = np.zeros(D) if overflow == 'drop' else gate * xs[t]
    np.testing.assert_allclose(out[t], expected, atol=1e-6)
  if overflow == 'drop':
    assert (out[2:] == 0).all()
  assert float(diag['dropped_fraction']) == pytest.approx(4 / 6)
  np.testing.assert_array_equal(
      np.asarray(diag['dispatch_mask'])[0, :, 0, :],
      np.eye(6, 2))  # token t in slot t of expert 0, for t < 2


@pytest.mark.parametrize('overflow', ['drop', 'pass_through'])
def test_first_choices_take_priority_over_second_choices(overflow):
  """Tokens 0-2 prefer expert 0 then 1; tokens 3-5 prefer 1 then 0; capacity 3.

  With choice-major priority every first choice fits and every second choice
  overflows. (Token-major order would instead fill expert 1 with the second
  choices of tokens 0-2 and drop the first choices of tokens 3-5.)
  """
  e, k = 3, 2
  layer = TopKMoE(num_experts=e, k=k, expert_hidden_units=H,
                  capacity_factor=0.75, overflow=overflow)
  assert layer.capacity(6) == 3
  rng = np.random.default_rng(3)
  xs = rng.standard_normal((1, 6, D))
  xs[0, :, :2] = [[1, 0]] * 3 + [[0, 1]] * 3
  x = jnp.asarray(xs, jnp.float32)
  kernel = np.zeros((D, e))
  kernel[0] = [3.0, 2.0, 0.0]
  kernel[1] = [2.0, 3.0, 0.0]
  params = _with_router(_params(layer, x, seed=3), kernel, np.zeros(e))
  out, diag = _apply(params, x, layer)
  p = _softmax(np.array([3.0, 2.0, 0.0]))
  g1, g2 = p[0], p[1]
  experts = params['params']['experts']
  for t in range(6):
    first = 0 if t < 3 else 1
    expected = g1 * _np_expert(experts, first, xs[0, t])
    if overflow == 'pass_through':
      expected = expected + g2 * xs[0, t]
    np.testing.assert_allclose(np.asarray(out[0, t]), expected, atol=1e-5)
  assert float(diag['dropped_fraction']) == pytest.approx(0.5)
  ref, overflowed = _np_topk(params, x, k, 3, overflow)
  assert overflowed == 6
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_aux_loss_is_exactly_zero_by_default():
  layer = TopKMoE(num_experts=4, k=2, expert_hidden_units=H)
  x = _tokens(4)
  params = _params(layer, x)
  _, diag = _apply(params, x, layer)
  assert float(diag['aux_loss']) == 0.0
  # ... although the individual losses are computed and non-zero.
  for name in ('importance_loss', 'load_loss', 'z_loss'):
    assert float(diag[name]) > 0.0


def test_aux_loss_values_match_formulas():
  e = 4
  layer = TopKMoE(num_experts=e, k=2, expert_hidden_units=H,
                  importance_loss_weight=0.3, load_loss_weight=0.7,
                  z_loss_weight=0.05)
  x = _tokens(5)
  params = _params(layer, x)
  _, diag = _apply(params, x, layer)
  logits, probs = _np_router(params, x)
  importance = probs.sum(axis=1)  # [B, E]
  cv2 = importance.var(axis=-1) / importance.mean(axis=-1) ** 2
  first = np.argmax(probs, axis=-1)
  f = np.stack([np.bincount(first[b], minlength=e) / T for b in range(B)])
  load = e * np.sum(f * probs.mean(axis=1), axis=-1)
  lse = np.log(np.exp(logits).sum(-1))
  z = np.mean(lse ** 2)
  np.testing.assert_allclose(float(diag['importance_loss']), cv2.mean(),
                             rtol=1e-4)
  np.testing.assert_allclose(float(diag['load_loss']), load.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(diag['z_loss']), z, rtol=1e-4)
  np.testing.assert_allclose(
      float(diag['aux_loss']),
      0.3 * cv2.mean() + 0.7 * load.mean() + 0.05 * z, rtol=1e-4)


@pytest.mark.parametrize('weight', ['importance_loss_weight',
                                    'load_loss_weight', 'z_loss_weight'])
def test_each_aux_loss_has_router_gradient(weight):
  layer = TopKMoE(num_experts=4, k=1, expert_hidden_units=H,
                  **{weight: 1.0})
  x = _tokens(6)
  params = _params(layer, x)

  def aux(router_kernel):
    p = _with_router(params, router_kernel, params['params']['router']['bias'])
    return layer.apply(p, x)[1]['aux_loss']

  kernel = params['params']['router']['kernel']
  value, grad = jax.jit(jax.value_and_grad(aux))(kernel)
  assert float(value) > 0.0
  grad = np.asarray(grad)
  assert np.isfinite(grad).all()
  assert np.abs(grad).max() > 1e-6


def test_router_noise():
  layer = TopKMoE(num_experts=4, k=2, expert_hidden_units=H,
                  router_noise_std=1.0)
  quiet = TopKMoE(num_experts=4, k=2, expert_hidden_units=H)
  x = _tokens(7)
  params = _params(layer, x)
  k1, k2 = _key(1), _key(2)
  noisy1, d1 = _apply(params, x, layer, deterministic=False,
                      rngs={'noise': k1})
  noisy1b, _ = _apply(params, x, layer, deterministic=False,
                      rngs={'noise': k1})
  noisy2, d2 = _apply(params, x, layer, deterministic=False,
                      rngs={'noise': k2})
  np.testing.assert_array_equal(np.asarray(noisy1), np.asarray(noisy1b))
  assert not np.allclose(noisy1, noisy2, atol=1e-4)
  assert not np.allclose(d1['router_probs'], d2['router_probs'], atol=1e-4)
  # Deterministic: the noise is ignored, whatever the key.
  clean, _ = _apply(params, x, quiet)
  det1, _ = _apply(params, x, layer, deterministic=True, rngs={'noise': k1})
  det2, _ = _apply(params, x, layer, deterministic=True, rngs={'noise': k2})
  det0, _ = _apply(params, x, layer, deterministic=True)
  for det in (det1, det2, det0):
    np.testing.assert_array_equal(np.asarray(det), np.asarray(clean))
  assert not np.allclose(noisy1, clean, atol=1e-4)


def test_diagnostic_shapes():
  e, k = 4, 2
  layer = TopKMoE(num_experts=e, k=k, expert_hidden_units=H)
  x = _tokens(8)
  out, diag = _apply(_params(layer, x), x, layer)
  c = layer.capacity(T)
  chex.assert_shape(out, (B, T, D))
  chex.assert_shape(diag['router_probs'], (B, T, e))
  chex.assert_shape(diag['dispatch_mask'], (B, T, e, c))
  chex.assert_shape(diag['combine_weights'], (B, T, e, c))
  chex.assert_shape(diag['expert_hidden'], (B, e, c, H))
  for name in ('aux_loss', 'dropped_fraction', 'importance_loss', 'load_loss',
               'z_loss'):
    chex.assert_shape(diag[name], ())
  np.testing.assert_allclose(np.asarray(diag['router_probs']).sum(-1), 1.0,
                             atol=1e-5)


@pytest.mark.parametrize('num_tokens,e,k,cf,expected', [
    (8, 4, 1, 1.0, 2), (8, 4, 2, 1.0, 4), (9, 4, 1, 1.0, 3),
    (121, 8, 1, 1.0, 16), (8, 4, 1, 4.0, 8), (8, 4, 1, 0.1, 1)])
def test_capacity_rule(num_tokens, e, k, cf, expected):
  layer = TopKMoE(num_experts=e, k=k, expert_hidden_units=2,
                  capacity_factor=cf)
  assert layer.capacity(num_tokens) == expected


def test_no_mixing_across_observations():
  layer = TopKMoE(num_experts=4, k=2, expert_hidden_units=H,
                  capacity_factor=0.5)
  x = _tokens(9)
  params = _params(layer, x)
  assert_no_mixing(lambda tokens: _apply(params, tokens, layer)[0], x,
                   3.0 * _tokens(10))


@pytest.mark.parametrize('kwargs,named', [
    (dict(num_experts=0), 'num_experts=0'),
    (dict(num_experts=4, k=5), 'k=5'),
    (dict(num_experts=4, k=0), 'k=0'),
    (dict(overflow='spill'), 'spill'),
    (dict(capacity_factor=0.0), 'capacity_factor=0.0'),
    (dict(capacity_factor=-2.0), 'capacity_factor=-2.0'),
    (dict(router_noise_std=-0.5), 'router_noise_std=-0.5'),
    (dict(expert_hidden_units=0), 'expert_hidden_units=0'),
])
def test_rejects_bad_options(kwargs, named):
  with pytest.raises(ValueError, match=named):
    TopKMoE(**kwargs)


def test_forward_pass_uses_no_deprecated_jax_calls():
  # jax.nn.one_hot on float positions is deprecated (DeprecationWarning now,
  # an error in a later JAX): buffer positions must be integer-typed.
  layer = TopKMoE(num_experts=4, k=2, expert_hidden_units=H)
  x = _tokens(11)
  params = _params(layer, x)
  with warnings.catch_warnings():
    warnings.simplefilter('error', DeprecationWarning)
    layer.apply(params, x)
