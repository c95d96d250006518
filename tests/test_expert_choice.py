"""Tests for networks.expert_choice.ExpertChoiceMoE (experts choose tokens)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_testing import assert_no_mixing, fast_key, random_params, random_tokens
from networks.expert_choice import ExpertChoiceMoE

B, T, D, H = 2, 8, 6, 8


_key = fast_key


def _tokens(seed, shape=(B, T, D)):
  return random_tokens(300 + seed, shape)


def _params(layer, tokens, seed=0):
  return random_params(layer, tokens, seed)


@functools.partial(jax.jit, static_argnames=('layer', 'deterministic'))
def _apply(params, tokens, layer, deterministic=True, rngs=None,
           expert_mask=None):
  kwargs = {} if expert_mask is None else {'expert_mask': expert_mask}
  return layer.apply(params, tokens, deterministic=deterministic, rngs=rngs,
                     **kwargs)


def _softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _np_expert_choice(params, tokens, capacity, expert_mask=None):
  """Reference: each expert takes its top-c tokens by router probability."""
  p = params['params']
  x = np.asarray(tokens, np.float64)
  r = p['router']
  probs = _softmax(x @ np.asarray(r['kernel'], np.float64) +
                   np.asarray(r['bias'], np.float64))  # [B, T, E]
  w1, b1 = np.asarray(p['experts']['w1']), np.asarray(p['experts']['b1'])
  w2, b2 = np.asarray(p['experts']['w2']), np.asarray(p['experts']['b2'])
  out = np.zeros_like(x)
  chosen = np.zeros(probs.shape[:1] + probs.shape[2:] + (capacity,), int)
  for b in range(x.shape[0]):
    for e in range(probs.shape[-1]):
      top = np.argsort(-probs[b, :, e], kind='stable')[:capacity]
      chosen[b, e] = top
      for t in top:
        y = np.maximum(x[b, t] @ w1[e] + b1[e], 0.0) @ w2[e] + b2[e]
        if expert_mask is not None:
          y = y * expert_mask[e]
        out[b, t] += probs[b, t, e] * y
  return out, probs, chosen


@pytest.mark.parametrize('num_experts,capacity_factor', [(4, 1.0), (3, 2.0),
                                                         (2, 0.5), (1, 1.0)])
def test_dispatch_and_output_match_reference(num_experts, capacity_factor):
  e = num_experts
  layer = ExpertChoiceMoE(num_experts=e, expert_hidden_units=H,
                          capacity_factor=capacity_factor)
  x = _tokens(0)
  params = _params(layer, x)
  out, diag = _apply(params, x, layer)
  c = layer.capacity(T)
  ref, probs, chosen = _np_expert_choice(params, x, c)
  dispatch = np.asarray(diag['dispatch_mask'])
  chex.assert_shape(dispatch, (B, e, c, T))
  chex.assert_shape(diag['router_probs'], (B, T, e))
  chex.assert_shape(diag['gates'], (B, e, c))
  chex.assert_shape(diag['expert_hidden'], (B, e, c, H))
  chex.assert_shape(diag['aux_loss'], ())
  # Each slot is one-hot over tokens; each expert fills exactly c slots with
  # c distinct tokens.
  assert set(np.unique(dispatch)) <= {0.0, 1.0}
  np.testing.assert_array_equal(dispatch.sum(axis=-1), np.ones((B, e, c)))
  np.testing.assert_array_equal(dispatch.sum(axis=(2, 3)), np.full((B, e), c))
  assert (dispatch.sum(axis=2) <= 1).all()
  # The chosen tokens are the expert's top-c by router probability.
  np.testing.assert_array_equal(dispatch.argmax(-1), chosen)
  np.testing.assert_allclose(np.asarray(diag['router_probs']), probs,
                             atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(diag['gates']),
      np.take_along_axis(probs.transpose(0, 2, 1), chosen, axis=-1),
      atol=1e-6)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  assert float(diag['aux_loss']) == 0.0


def test_tokens_no_expert_took_output_zero():
  layer = ExpertChoiceMoE(num_experts=1, expert_hidden_units=H,
                          capacity_factor=0.5)
  x = _tokens(1)
  params = _params(layer, x)
  assert layer.capacity(T) == 4
  out, diag = _apply(params, x, layer)
  taken = np.asarray(diag['dispatch_mask']).sum(axis=(1, 2)) > 0  # [B, T]
  assert taken.sum(axis=1).tolist() == [4] * B
  out = np.asarray(out)
  assert (out[~taken] == 0).all()
  assert (np.abs(out[taken]).sum(-1) > 0).all()


def test_expert_mask_scales_expert_outputs():
  layer = ExpertChoiceMoE(num_experts=3, expert_hidden_units=H)
  x = _tokens(2)
  params = _params(layer, x)
  mask = np.array([0.0, 1.0, 0.5])
  out, _ = _apply(params, x, layer, expert_mask=jnp.tile(mask, (B, 1)))
  ref, _, _ = _np_expert_choice(params, x, layer.capacity(T), mask)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.parametrize('num_tokens,e,cf,expected', [
    (8, 4, 1.0, 2), (9, 4, 1.0, 3), (121, 8, 1.0, 16), (8, 4, 0.1, 1),
    (8, 2, 4.0, 8),  # ceil(16) capped at the number of tokens
    (8, 1, 1.0, 8)])
def test_capacity_rule(num_tokens, e, cf, expected):
  layer = ExpertChoiceMoE(num_experts=e, expert_hidden_units=2,
                          capacity_factor=cf)
  assert layer.capacity(num_tokens) == expected
  assert expected == min(num_tokens, math.ceil(cf * num_tokens / e))


def test_router_noise():
  layer = ExpertChoiceMoE(num_experts=4, expert_hidden_units=H,
                          router_noise_std=1.0)
  quiet = ExpertChoiceMoE(num_experts=4, expert_hidden_units=H)
  x = _tokens(3)
  params = _params(layer, x)
  n1, _ = _apply(params, x, layer, deterministic=False,
                 rngs={'noise': _key(1)})
  n2, _ = _apply(params, x, layer, deterministic=False,
                 rngs={'noise': _key(2)})
  assert not np.allclose(n1, n2, atol=1e-4)
  clean, _ = _apply(params, x, quiet)
  det, _ = _apply(params, x, layer, deterministic=True,
                  rngs={'noise': _key(1)})
  np.testing.assert_array_equal(np.asarray(det), np.asarray(clean))


def test_no_mixing_across_observations():
  layer = ExpertChoiceMoE(num_experts=4, expert_hidden_units=H)
  x = _tokens(4)
  params = _params(layer, x)
  assert_no_mixing(lambda tokens: _apply(params, tokens, layer)[0], x,
                   4.0 * _tokens(5))


@pytest.mark.parametrize('kwargs,named', [
    (dict(num_experts=0), 'num_experts=0'),
    (dict(capacity_factor=0.0), 'capacity_factor=0.0'),
    (dict(capacity_factor=-1.0), 'capacity_factor=-1.0'),
    (dict(expert_hidden_units=0), 'expert_hidden_units=0'),
])
def test_rejects_bad_options(kwargs, named):
  with pytest.raises(ValueError, match=named):
    ExpertChoiceMoE(**kwargs)


def test_rejects_negative_router_noise():
  # TopKMoE rejects router_noise_std < 0; ExpertChoiceMoE shares the router
  # and must not silently treat a negative std as "no noise".
  with pytest.raises(ValueError, match='router_noise_std=-0.5'):
    ExpertChoiceMoE(router_noise_std=-0.5)
