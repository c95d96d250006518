"""Tests for networks.q_network.QNetwork across every penultimate layer.

Small networks (MLP encoder split into 4 tokens of 8 dims, or a narrow Nature
CNN on 36x36 frames) are configured through gin, as in the experiments; the
reference parameter counts use the full Nature CNN on 84x84x4 frames, counted
with jax.eval_shape (nothing is computed).
"""

import functools

import chex
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from networks.penultimate import PENULTIMATES
from networks.q_network import QNetwork, count_parameters, parameter_table

B, OBS, A = 4, 5, 3


def _key(seed):
  """A PRNG key whose bit generator compiles fast on CPU (threefry does not)."""
  return jax.random.key(seed, impl='unsafe_rbg')

_SMALL = """
MLPEncoder.hidden_units = (32,)
MLPEncoder.num_tokens = 4
DensePenultimate.hidden_units = 16
TokenMLP.hidden_units = 16
SoftMoE.num_experts = 3
SoftMoE.expert_hidden_units = 8
TopKMoE.num_experts = 2
TopKMoE.expert_hidden_units = 8
TopKMoE.capacity_factor = 2.0
TopKMoE.importance_loss_weight = 1.0
TopKMoE.load_loss_weight = 1.0
TopKMoE.z_loss_weight = 1.0
ExpertChoiceMoE.num_experts = 2
ExpertChoiceMoE.expert_hidden_units = 8
"""

# name -> (penultimate, extra gin bindings)
CASES = {
    'dense': ('dense', ''),
    'softmoe': ('softmoe', ''),
    'softmoe_normalized': ('softmoe', 'SoftMoE.normalization = True'),
    'topk_k1': ('topk', 'TopKMoE.k = 1'),
    'topk_k2': ('topk', 'TopKMoE.k = 2'),
    'expert_choice': ('expert_choice', ''),
    'gap': ('gap', ''),
    'token_mlp': ('token_mlp', ''),
    'token_mlp_flatten': ('token_mlp', "TokenMLP.reduction = 'flatten'"),
}


def test_cases_cover_every_penultimate():
  assert {p for p, _ in CASES.values()} == set(PENULTIMATES)


def _small_network(case, **kwargs):
  penultimate, extra = CASES[case]
  gin.parse_config(_SMALL + extra)
  return QNetwork(num_actions=A, encoder='mlp', penultimate=penultimate,
                  **kwargs)


def _observations(seed, shape=(B, OBS)):
  rng = np.random.default_rng(500 + seed)
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# Fresh jitted closures per network rather than a jit cache keyed on the
# network: two networks built under different gin bindings must never share a
# compiled function.
def _init(net, obs):
  return jax.jit(lambda o: net.init(_key(0), o))(obs)


_CACHED_PARAMS = {}


def _small_network_and_params(case):
  """Parses the case's gin config (every test) and initialises once per case."""
  net = _small_network(case)
  if case not in _CACHED_PARAMS:
    _CACHED_PARAMS[case] = _init(net, _observations(0))
  return net, _CACHED_PARAMS[case]


def _q_fn(net):
  return jax.jit(lambda p, o: net.apply(p, o, deterministic=True).q_values)


def _loss(params, obs, net):
  out = net.apply(params, obs, deterministic=True)
  return jnp.sum(out.q_values ** 2) + out.aux_loss


def _grad(net, params, obs):
  return jax.jit(jax.grad(lambda p, o: _loss(p, o, net)))(params, obs)


@pytest.mark.parametrize('case', sorted(CASES))
def test_gradients_reach_every_parameter(case):
  net, params = _small_network_and_params(case)
  obs = _observations(0)

  def loss(p):
    out = net.apply(p, obs, deterministic=True)
    return jnp.sum(out.q_values ** 2) + out.aux_loss, out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params)
  chex.assert_shape(out.q_values, (B, A))
  chex.assert_shape(out.aux_loss, ())
  if case.startswith('topk'):
    # All three auxiliary losses are on, so aux_loss is positive, and every
    # expert receives at least one token (else its gradient would be zero
    # by construction, not by a bug).
    assert float(out.aux_loss) > 0
    assert (np.asarray(out.diagnostics['dispatch_mask']).sum(
        axis=(0, 1, 3)) > 0).all()
  else:
    assert float(out.aux_loss) == 0.0
  assert np.isfinite(float(value))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  if PENULTIMATES[CASES[case][0]] is not PENULTIMATES['gap']:
    assert any("'penultimate'" in n for n in names)
  if case.startswith('topk') or case == 'expert_choice':
    assert any("'router'" in n for n in names)
  for name, (_, g) in zip(names, flat):
    g = np.asarray(g)
    assert np.isfinite(g).all(), name
    assert (g != 0).any(), f'{case}: zero gradient for {name}'


def test_top1_router_gets_gradient_through_the_gate_alone():
  """k = 1, no auxiliary loss: the router learns only through the gate."""
  gin.parse_config(_SMALL + """
      TopKMoE.k = 1
      TopKMoE.importance_loss_weight = 0.0
      TopKMoE.load_loss_weight = 0.0
      TopKMoE.z_loss_weight = 0.0""")
  net = QNetwork(num_actions=A, encoder='mlp', penultimate='topk')
  obs = _observations(1)
  params = _init(net, obs)
  grads = _grad(net, params, obs)
  router = grads['params']['penultimate']['router']
  for name in ('kernel', 'bias'):
    g = np.asarray(router[name])
    assert np.isfinite(g).all() and (g != 0).any(), name


@pytest.mark.parametrize('case', sorted(CASES) + ['topk_tight'])
def test_no_mixing_across_observations(case):
  if case == 'topk_tight':  # capacity 1 per expert: overflow within a sample
    gin.parse_config(_SMALL + 'TopKMoE.capacity_factor = 0.5')
    net = QNetwork(num_actions=A, encoder='mlp', penultimate='topk')
    params = _init(net, _observations(0))
  else:
    net, params = _small_network_and_params(case)
  obs = _observations(2)
  q_fn = _q_fn(net)
  q = np.asarray(q_fn(params, obs))
  other = 3.0 * _observations(3)
  # Change every observation but the first, then only the first: the Q-values
  # of the unchanged observations must not move.
  for changed in (slice(1, None), slice(0, 1)):
    q_y = np.asarray(q_fn(params, obs.at[changed].set(other[changed])))
    kept = np.ones(B, bool)
    kept[changed] = False
    assert not np.allclose(q_y[~kept], q[~kept], atol=1e-4)  # they did change
    np.testing.assert_allclose(q_y[kept], q[kept], atol=1e-6)
  # Each observation evaluated on its own (a batch of one, vmapped) gives the
  # Q-values it gets inside the batch.
  q_alone = jax.jit(jax.vmap(
      lambda o: net.apply(params, o[None], deterministic=True).q_values[0]))(
          obs)
  np.testing.assert_allclose(np.asarray(q_alone), q, atol=1e-5)


def test_small_nature_cnn_softmoe():
  gin.parse_config("""
      NatureCNN.width_multiplier = 0.25
      SoftMoE.num_experts = 2
      SoftMoE.expert_hidden_units = 8""")
  net = QNetwork(num_actions=A, penultimate='softmoe')  # per_conv tokens
  rng = np.random.default_rng(6)
  obs = jnp.asarray(rng.integers(0, 256, (2, 36, 36, 4)), jnp.uint8)
  params = _init(net, obs)

  def loss(p):
    out = net.apply(p, obs)
    return jnp.sum(out.q_values ** 2), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
  # 36x36 -> 9x9 -> 5x5 map of 16 channels: 25 tokens of 16 dims.
  tokens, dim = 25, 16
  slots = -(-tokens // 2)
  chex.assert_shape(out.diagnostics['dispatch_weights'], (2, tokens, 2, slots))
  chex.assert_shape(out.diagnostics['expert_hidden'], (2, 2, slots, 8))
  chex.assert_shape(out.features, (2, tokens * dim))
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    g = np.asarray(g)
    assert np.isfinite(g).all() and (g != 0).any(), jax.tree_util.keystr(path)


def _count(net, shape=(1, 84, 84, 4)):
  obs = jax.ShapeDtypeStruct(shape, jnp.uint8)
  return jax.eval_shape(net.init, jax.random.PRNGKey(0), obs)


def test_dense_baseline_parameter_count():
  params = _count(QNetwork(num_actions=18))
  assert count_parameters(params['params']) == 4_052_658
  table = parameter_table(params['params'])
  assert table['encoder'] == 77_984
  assert sum(table.values()) == 4_052_658


def test_impala_encoder_shape_and_parameter_count():
  # Espeholt et al.'s stacks (16, 32, 32): a 3x3 conv, then two residual blocks
  # of two 3x3 convs each; 84 -> 42 -> 21 -> 11 after the three max-pools.
  net = QNetwork(num_actions=18, encoder='impala_cnn')
  params = _count(net)['params']
  expected, channels_in = 0, 4
  for channels in (16, 32, 32):
    expected += 9 * channels_in * channels + channels  # the stack's conv
    expected += 4 * (9 * channels * channels + channels)  # 2 blocks x 2 convs
    channels_in = channels
  assert parameter_table(params)['encoder'] == expected == 97_744
  features = jax.eval_shape(
      lambda p, o: net.apply({'params': p}, o, method=lambda m, x: m.encoder(x)),
      params, jax.ShapeDtypeStruct((2, 84, 84, 4), jnp.uint8))
  assert features.shape == (2, 11, 11, 32)


def test_soft_moe_parameter_count():
  gin.parse_config("""
      SoftMoE.num_experts = 8
      SoftMoE.expert_hidden_units = 512
      SoftMoE.capacity_factor = 1.0""")
  params = _count(QNetwork(num_actions=18, penultimate='softmoe'))['params']
  assert params['penultimate']['phi'].shape == (64, 8, 16)  # 121 tokens
  assert count_parameters(params) == 754_482
  gin.bind_parameter('SoftMoE.normalization', True)
  normalized = _count(QNetwork(num_actions=18, penultimate='softmoe'))
  assert count_parameters(normalized['params']) == 754_482 + 1


def test_parameter_matched_soft_moe_counts_agree():
  counts = {}
  for e in (1, 2, 4, 8):
    gin.clear_config()
    gin.parse_config(f"""
        SoftMoE.num_experts = {e}
        SoftMoE.expert_hidden_units = {512 // e}""")
    params = _count(QNetwork(num_actions=18, penultimate='softmoe'))['params']
    counts[e] = count_parameters(params)
    assert params['penultimate']['experts']['w1'].shape == (e, 64, 512 // e)
  assert max(counts.values()) / min(counts.values()) <= 1.02, counts


@pytest.mark.parametrize('kwargs,named', [
    (dict(encoder='resnet9'), 'resnet9'),
    (dict(tokenizer='per_pixel'), 'per_pixel'),
    (dict(penultimate='switch'), 'switch'),
    (dict(num_actions=0), 'num_actions=0'),
    (dict(num_atoms=51, v_min=1.0, v_max=1.0), 'v_min=1.0'),
])
def test_rejects_bad_options(kwargs, named):
  kwargs.setdefault('num_actions', 3)
  with pytest.raises(ValueError, match=named):
    QNetwork(**kwargs)


@pytest.mark.parametrize('binding,named', [
    ('TopKMoE.k = 3', 'k=3'),
    ('TopKMoE.k = 0', 'k=0'),
    ("TopKMoE.overflow = 'spill'", 'spill'),
    ('TopKMoE.num_experts = 0', 'num_experts=0'),
    ('TopKMoE.capacity_factor = 0.0', 'capacity_factor=0.0'),
])
def test_gin_bound_bad_moe_options_are_rejected(binding, named):
  gin.parse_config(_SMALL + binding)
  # Rejected when the network is built (or, at the latest, initialised).
  with pytest.raises(ValueError, match=named):
    net = QNetwork(num_actions=A, encoder='mlp', penultimate='topk')
    jax.eval_shape(net.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, OBS), jnp.float32))


def test_expert_mask_needs_an_moe_layer():
  net = _small_network('dense')
  obs = _observations(4)
  with pytest.raises(ValueError, match='dense'):
    jax.eval_shape(
        functools.partial(net.init, expert_mask=jnp.ones((B, 2))),
        _key(0), obs)


def test_expert_mask_reaches_the_moe_layer():
  net, params = _small_network_and_params('softmoe')
  obs = _observations(5)
  apply = jax.jit(net.apply)
  full = apply(params, obs, expert_mask=jnp.ones((B, 3)))
  ref = apply(params, obs)
  np.testing.assert_allclose(np.asarray(full.q_values),
                             np.asarray(ref.q_values), atol=1e-6)
  none = apply(params, obs, expert_mask=jnp.zeros((B, 3)))
  # With every expert masked the MoE output is zero: Q = head bias.
  np.testing.assert_allclose(np.asarray(none.features), 0.0, atol=1e-7)
  np.testing.assert_allclose(
      np.asarray(none.q_values),
      np.tile(np.asarray(params['params']['head']['q']['bias']), (B, 1)),
      atol=1e-6)
