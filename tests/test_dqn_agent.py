"""The DQN / Rainbow agents: action selection, schedules, the jitted train step,
target syncs, fused steps, auxiliary MoE losses, priorities, noisy nets and
the replay ratio of the batched `record`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.dqn_agent import DQNAgent, create_optimizer, linearly_decaying_epsilon
from agents.rainbow_agent import RainbowAgent
from experiments import gin_config

OBS_DIM = 4
NUM_ACTIONS = 3

MLP_BINDINGS = [
    "QNetwork.encoder = 'mlp'",
    'MLPEncoder.hidden_units = (32,)',
    "QNetwork.penultimate = 'dense'",
    'DensePenultimate.hidden_units = 32',
]


def _copy(tree):
  return jax.tree_util.tree_map(jnp.array, tree)


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


def _make_agent(extra_bindings=(), cls=DQNAgent, num_envs=1, seed=0, **kwargs):
  gin_config.load([], MLP_BINDINGS + list(extra_bindings))
  defaults = dict(min_replay_history=64, batch_size=8, replay_capacity=1000)
  defaults.update(kwargs)
  return cls(NUM_ACTIONS, (OBS_DIM,), np.float32, 1, num_envs=num_envs,
             seed=seed, **defaults)


def _random_batch(rng, batch_size=8, prioritized=False):
  batch = {
      'obs_tm1': rng.normal(size=(batch_size, OBS_DIM)).astype(np.float32),
      'a_tm1': rng.integers(0, NUM_ACTIONS, size=batch_size).astype(np.int32),
      'r_t': rng.normal(size=batch_size).astype(np.float32),
      'discount_t': np.full(batch_size, 0.99, np.float32),
      'obs_t': rng.normal(size=(batch_size, OBS_DIM)).astype(np.float32),
  }
  if prioritized:
    batch['sampling_probabilities'] = rng.uniform(
        0.01, 0.1, size=batch_size).astype(np.float32)
  return batch


def _fill_replay(agent, steps, rng, num_envs=1):
  """Records `steps` calls of random transitions (episodes of 20 steps)."""
  for t in range(steps):
    obs = rng.normal(size=(num_envs, OBS_DIM)).astype(np.float32)
    actions = rng.integers(0, NUM_ACTIONS, size=num_envs)
    rewards = rng.normal(size=num_envs)
    end = (t % 20) == 19
    agent.record(obs, actions, rewards, np.full(num_envs, end),
                 np.full(num_envs, end))


# -- Action selection ------------------------------------------------------------


def test_select_actions_shape_and_dtype():
  agent = _make_agent()
  obs = np.random.default_rng(0).normal(size=(5, OBS_DIM)).astype(np.float32)
  actions = agent.select_actions(obs)
  assert isinstance(actions, np.ndarray)
  assert actions.shape == (5,)
  assert np.issubdtype(actions.dtype, np.integer)
  assert np.all((actions >= 0) & (actions < NUM_ACTIONS))


def test_epsilon_one_is_uniform_and_epsilon_zero_is_greedy():
  agent = _make_agent()
  params = agent.state.online_params
  n = 6000
  obs = np.random.default_rng(1).normal(size=(n, OBS_DIM)).astype(np.float32)
  random_actions = np.asarray(
      agent._select_action(params, obs, jax.random.PRNGKey(7), 1.0))
  counts = np.bincount(random_actions, minlength=NUM_ACTIONS)
  expected = n / NUM_ACTIONS
  sigma = np.sqrt(n * (1 / NUM_ACTIONS) * (1 - 1 / NUM_ACTIONS))
  assert np.all(np.abs(counts - expected) < 5 * sigma), counts
  greedy = np.asarray(agent.network.apply({'params': params}, obs).q_values
                      ).argmax(-1)
  # Greedy must be non-trivial for the comparison to mean something.
  assert len(np.unique(greedy)) > 1
  # With epsilon 1 the actions do not follow the greedy ones.
  assert np.mean(random_actions == greedy) < 0.5
  for seed in range(3):
    actions = np.asarray(
        agent._select_action(params, obs, jax.random.PRNGKey(seed), 0.0))
    np.testing.assert_array_equal(actions, greedy)


@pytest.mark.parametrize('name', ['adam', 'rmsprop', 'sgd'])
def test_optimizers_first_update_by_hand(name):
  # First step from zero moments: Adam's bias-corrected step is lr * g / (|g| +
  # eps); RMSProp's is lr * g / sqrt((1 - beta2) g^2 + eps) (optax puts eps
  # inside the root); SGD's is lr * g.
  lr, beta2, eps = 0.1, 0.9, 1e-3
  g = np.array([0.5, -2.0, 0.0], np.float32)
  want = {'adam': lr * g / (np.abs(g) + eps),
          'rmsprop': lr * g / np.sqrt((1 - beta2) * g ** 2 + eps),
          'sgd': lr * g}[name]
  optimizer = create_optimizer(name, learning_rate=lr, beta2=beta2, eps=eps)
  params = jnp.zeros(3)
  updates, _ = optimizer.update(jnp.asarray(g), optimizer.init(params), params)
  np.testing.assert_allclose(-np.asarray(updates), want, rtol=1e-5)


def test_unknown_optimizer_is_refused():
  with pytest.raises(ValueError, match="'lamb' is unknown"):
    create_optimizer('lamb')


def test_epsilon_schedule_matches_dopamine():
  agent = _make_agent(min_replay_history=100, epsilon_decay_period=1000,
                      epsilon_train=0.01, epsilon_eval=0.05)
  # Dopamine: steps_left = decay + warmup - step;
  # eps = epsilon + clip((1 - epsilon) * steps_left / decay, 0, 1 - epsilon).
  hand = {0: 1.0, 50: 1.0, 100: 1.0, 350: 0.7525, 600: 0.505, 850: 0.2575,
          1100: 0.01, 5000: 0.01}
  for step, value in hand.items():
    assert linearly_decaying_epsilon(1000, step, 100, 0.01) == pytest.approx(
        value, abs=1e-12)
    agent.training_steps = step
    assert agent.epsilon() == pytest.approx(value, abs=1e-12)
  agent.eval_mode = True
  assert agent.epsilon() == pytest.approx(0.05)


def test_rainbow_noisy_epsilon_is_zero_in_training_but_not_noisy_decays():
  noisy = _make_agent(cls=RainbowAgent, num_atoms=11, min_replay_history=100,
                      epsilon_decay_period=1000, epsilon_train=0.01,
                      epsilon_eval=0.001)
  noisy.training_steps = 0  # Dopamine's zero_epsilon: the noise explores
  assert noisy.epsilon() == 0.0
  noisy.eval_mode = True
  assert noisy.epsilon() == pytest.approx(0.001)
  plain = _make_agent(cls=RainbowAgent, num_atoms=11, noisy=False,
                      min_replay_history=100, epsilon_decay_period=1000,
                      epsilon_train=0.01)
  plain.training_steps = 600
  assert plain.epsilon() == pytest.approx(0.505)


# -- Train step ------------------------------------------------------------------


def test_target_network_syncs_every_target_period_over_update_period():
  agent = _make_agent(update_period=4, target_update_period=40)  # every 10 steps
  rng = np.random.default_rng(0)
  state = agent.state
  initial = _copy(state.online_params)
  online_at_10 = None
  for step in range(1, 23):
    state, _ = agent.train_step(state, _random_batch(rng))
    assert int(state.step) == step
    online, target = state.online_params, state.target_params
    assert not _leaves_equal(online, initial)
    if step < 10:
      assert _leaves_equal(target, initial), step
      assert not _leaves_equal(target, online), step
    elif step == 10 or step == 20:
      assert _leaves_equal(target, online), step
      online_at_10 = _copy(online) if step == 10 else online_at_10
    elif step < 20:
      assert _leaves_equal(target, online_at_10), step
      assert not _leaves_equal(target, online), step
    else:  # 21, 22
      assert not _leaves_equal(target, online), step
      assert not _leaves_equal(target, online_at_10), step


def test_train_step_compiles_once():
  agent = _make_agent(min_replay_history=32, update_period=1)
  _fill_replay(agent, 80, np.random.default_rng(0))
  assert int(agent.state.step) >= 40  # real replay batches went through it
  assert agent.train_step._cache_size() == 1


SOFTMOE_BINDINGS = [
    'MLPEncoder.num_tokens = 4',
    "QNetwork.penultimate = 'softmoe'",
    'SoftMoE.num_experts = 2',
    'SoftMoE.expert_hidden_units = 16',
]


@pytest.mark.parametrize('bindings', [[], SOFTMOE_BINDINGS],
                         ids=['dense', 'softmoe'])
def test_fused_steps_equal_sequential_steps(bindings):
  agent = _make_agent(bindings, update_period=1,
                      target_update_period=3)  # syncs inside
  if bindings:  # the Soft MoE layer is really there
    assert 'experts' in agent.state.online_params['penultimate']
  rng = np.random.default_rng(0)
  k = 5
  batches = [_random_batch(rng) for _ in range(k)]
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
  state0 = _copy(agent.state)

  sequential = _copy(state0)
  losses = []
  for batch in batches:
    sequential, metrics = agent.train_step(sequential, batch)
    losses.append(float(metrics['loss']))
  fused, fused_metrics = agent.train_steps(_copy(state0), stacked)

  assert int(fused.step) == int(sequential.step) == k
  for a, b in zip(jax.tree_util.tree_leaves(fused.online_params),
                  jax.tree_util.tree_leaves(sequential.online_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(fused.target_params),
                  jax.tree_util.tree_leaves(sequential.target_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(fused.rng),
                                np.asarray(sequential.rng))
  fused_opt = jax.tree_util.tree_leaves(fused.opt_state)
  sequential_opt = jax.tree_util.tree_leaves(sequential.opt_state)
  assert fused_opt and len(fused_opt) == len(sequential_opt)
  assert (jax.tree_util.tree_structure(fused.opt_state) ==
          jax.tree_util.tree_structure(sequential.opt_state))
  for a, b in zip(fused_opt, sequential_opt):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert not _leaves_equal(fused.opt_state, state0.opt_state)
  assert np.asarray(fused_metrics['loss']).shape == (k,)
  np.testing.assert_allclose(np.asarray(fused_metrics['loss']), losses,
                             rtol=1e-5, atol=1e-6)
  # And the state did move: this is not a comparison of two no-ops.
  assert not _leaves_equal(fused.online_params, state0.online_params)


def test_stacked_frames_are_sampled_frame_first_and_moved_on_device():
  """Atari-like agents sample [B, 4, H, W] and their train step equals the
  plain step on the same stacks laid out [B, H, W, 4]."""
  import functools  # pylint: disable=g-import-not-at-top
  from agents import dqn_agent, losses  # pylint: disable=g-import-not-at-top
  gin_config.load([], ["QNetwork.penultimate = 'dense'",
                       'DensePenultimate.hidden_units = 16'])
  agent = DQNAgent(NUM_ACTIONS, (12, 12), np.uint8, 4, min_replay_history=10**6,
                   batch_size=4, replay_capacity=200, log_expert_metrics=False)
  rng = np.random.default_rng(0)
  for t in range(40):
    end = np.array([t % 9 == 8])
    agent.record(rng.integers(0, 256, (1, 12, 12, 4), dtype=np.uint8),
                 [int(t % NUM_ACTIONS)], [1.0], end, end)
  batch = agent.replay.sample()
  batch.pop('indices')
  assert batch['obs_tm1'].shape == (4, 4, 12, 12)
  plain = dqn_agent.make_train_step(
      agent.network, agent.optimizer,
      functools.partial(dqn_agent.dqn_td_loss, losses.mse_loss),
      target_update_every=agent.target_update_period // agent.update_period,
      double_dqn=False, prioritized=False)
  moved = dict(batch, obs_tm1=np.moveaxis(batch['obs_tm1'], 1, -1),
               obs_t=np.moveaxis(batch['obs_t'], 1, -1))
  state_a, metrics_a = jax.jit(agent.train_step_fn)(_copy(agent.state), batch)
  state_b, metrics_b = jax.jit(plain)(_copy(agent.state), moved)
  assert float(metrics_a['loss']) == pytest.approx(float(metrics_b['loss']), rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(state_a.online_params),
                  jax.tree_util.tree_leaves(state_b.online_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert not _leaves_equal(state_a.online_params, agent.state.online_params)


def test_train_step_loss_is_the_td_loss_of_the_batch():
  agent = _make_agent(loss_type='huber')
  batch = _random_batch(np.random.default_rng(3))
  params = _copy(agent.state.online_params)
  state, metrics = agent.train_step(_copy(agent.state), batch)
  q_tm1 = np.asarray(agent.network.apply({'params': params},
                                         batch['obs_tm1']).q_values)
  q_t = np.asarray(agent.network.apply({'params': params},
                                       batch['obs_t']).q_values)  # target = online at init
  target = batch['r_t'] + batch['discount_t'] * q_t.max(-1)
  td = target - q_tm1[np.arange(len(target)), batch['a_tm1']]
  huber = np.where(np.abs(td) <= 1, 0.5 * td ** 2, np.abs(td) - 0.5)
  np.testing.assert_allclose(float(metrics['td_loss']), huber.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss']), huber.mean(), rtol=1e-5)
  assert float(metrics['aux_loss']) == 0.0


TOPK_BINDINGS = [
    'MLPEncoder.num_tokens = 4',
    "QNetwork.penultimate = 'topk'",
    'TopKMoE.num_experts = 4',
    'TopKMoE.k = 1',
    'TopKMoE.expert_hidden_units = 16',
]


def test_moe_aux_loss_is_added_to_the_td_loss():
  agent = _make_agent(TOPK_BINDINGS + ['TopKMoE.load_loss_weight = 1.0'])
  batch = _random_batch(np.random.default_rng(4), batch_size=16)
  params = _copy(agent.state.online_params)
  state, metrics = agent.train_step(_copy(agent.state), batch)
  td, aux, total = (float(metrics[k]) for k in ('td_loss', 'aux_loss', 'loss'))
  assert aux > 0
  assert total == pytest.approx(td + aux, rel=1e-6)
  # The aux loss is the network's load loss on obs_tm1 under the old params.
  out = jax.jit(lambda p, x: agent.network.apply({'params': p}, x))(
      params, batch['obs_tm1'])
  assert aux == pytest.approx(float(out.aux_loss), rel=1e-5)
  assert aux == pytest.approx(float(out.diagnostics['load_loss']), rel=1e-5)

  # It is in the gradient, not only reported: same init, weight 0 vs 1.
  agent0 = _make_agent(TOPK_BINDINGS + ['TopKMoE.load_loss_weight = 0.0'])
  assert _leaves_equal(agent0.state.online_params, params)
  state0, metrics0 = agent0.train_step(_copy(agent0.state), batch)
  assert float(metrics0['aux_loss']) == 0.0
  assert float(metrics0['td_loss']) == pytest.approx(td, rel=1e-6)
  router = lambda p: p['penultimate']['router']['kernel']
  assert not np.allclose(np.asarray(router(state.online_params)),
                         np.asarray(router(state0.online_params)))


# -- Rainbow ---------------------------------------------------------------------


def test_rainbow_priorities_reach_the_sum_tree_before_the_next_sample():
  agent = _make_agent(cls=RainbowAgent, num_atoms=11, min_replay_history=10**6)
  _fill_replay(agent, 100, np.random.default_rng(5))
  assert int(agent.state.step) == 0
  replay = agent.replay
  valid = replay.valid_indices()
  np.testing.assert_array_equal(replay.get_priorities(valid), 1.0)  # the max

  sampled, seen = [], []  # each sample's indices, and the priorities it saw
  original_sample = replay.sample

  def spy(*args, **kwargs):
    seen.append(replay.get_priorities(valid))
    batch = original_sample(*args, **kwargs)
    assert 'sampling_probabilities' in batch
    sampled.append(batch['indices'].copy())
    return batch

  replay.sample = spy
  agent.train_once()
  agent.train_once()
  assert int(agent.state.step) == 2
  after = seen[1]  # what the second step sampled from
  changed = np.isin(valid, sampled[0])
  assert np.all(np.isfinite(after)) and np.all(after > 0)
  # Every transition of the first step got a new priority sqrt(loss + 1e-10)
  # != 1 ...
  assert np.all(after[changed] != 1.0)
  # ... and is the cross-entropy's square root: C51 losses here are around
  # log(11) ~ 2.4, so priorities are around 1.5.
  assert np.all((after[changed] > 0.5) & (after[changed] < 3.0))
  # The others kept theirs.
  np.testing.assert_array_equal(after[~changed], 1.0)
  # A checkpoint holds the second step's priorities too.
  agent.checkpoint_state()
  final = replay.get_priorities(valid)
  second_only = np.isin(valid, sampled[1]) & ~changed
  assert second_only.any()
  assert np.all(final[second_only] != 1.0)


def test_rainbow_new_records_take_the_max_priority_of_the_last_step():
  """Dopamine writes a step's priorities at once, and a new record takes the
  tree's max priority: a step's priorities must be in the tree before the
  next record too, not only before the next sample."""
  agent = _make_agent(cls=RainbowAgent, num_atoms=11, min_replay_history=10**6,
                      replay_capacity=100)
  rng = np.random.default_rng(8)
  _fill_replay(agent, 100, rng)  # full: the next record overwrites slot 0
  replay = agent.replay
  assert replay.sum_tree.max_recorded == 1.0
  original_sample = replay.sample
  replay.sample = lambda *a, **k: original_sample(
      indices=np.array([0, 1, 2, 3, 4, 5, 6, 7]))  # slot 0 is sampled
  agent.train_once()
  replay.sample = original_sample
  # C51 losses here are around log(11) ~ 2.4: priorities around 1.5.
  priorities = np.asarray(agent._pending_priorities[1])  # sqrt(loss + 1e-10)
  assert priorities.max() > 1.0
  _fill_replay(agent, 1, rng)  # overwrites slot 0
  # The new record has the max including the step's priorities, and the
  # sampled slot it replaced does not get the old transition's priority.
  assert replay.get_priorities(np.array([0]))[0] == pytest.approx(
      priorities.max())
  np.testing.assert_allclose(replay.get_priorities(np.arange(1, 8)),
                             priorities[1:], rtol=1e-6)


def _c51_projection(target_support, probs, support):
  """Bellemare et al. (2017), Algorithm 1, atom by atom in float64: each
  clipped target atom's mass goes to its two neighbouring support atoms in
  proportion to proximity (all of it to an atom it lands on)."""
  v_min, v_max = support[0], support[-1]
  dz = (v_max - v_min) / (len(support) - 1)
  out = np.zeros((target_support.shape[0], len(support)))
  for i, j in np.ndindex(*target_support.shape):
    b = (np.clip(target_support[i, j], v_min, v_max) - v_min) / dz
    lo, hi = int(np.floor(b)), int(np.ceil(b))
    if lo == hi:
      out[i, lo] += probs[i, j]
    else:
      out[i, lo] += probs[i, j] * (hi - b)
      out[i, hi] += probs[i, j] * (b - lo)
  return out


def _log_softmax(logits):
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_the_tests_c51_projection_matches_a_hand_worked_case():
  # Support -1, 0, 1: 0.5 splits its 0.2 evenly between 0 and 1; 2.0 is
  # clipped to 1 and lands on it; -0.25 gives a quarter of its 0.5 to -1 and
  # three quarters to 0; 0.0 lands on 0.
  out = _c51_projection(np.array([[0.5, 2.0, -0.25], [0.0, -3.0, 1.0]]),
                        np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]),
                        np.array([-1.0, 0.0, 1.0]))
  np.testing.assert_allclose(out, [[0.125, 0.475, 0.4], [0.3, 0.6, 0.1]],
                             atol=1e-12)


def test_rainbow_train_step_prioritized_metrics():
  """Priorities sqrt(ce + 1e-10) and the importance-weighted TD loss, from a
  C51 cross-entropy computed here from the network's logits."""
  # Noise off, so the forward passes here are the train step's; double DQN on
  # (the default) with target params unlike the online ones, so that which
  # network picks the bootstrap action matters.
  agent = _make_agent(cls=RainbowAgent, num_atoms=11, noisy=False)
  rng = np.random.default_rng(6)
  batch = _random_batch(rng, prioritized=True)
  batch['r_t'][:2], batch['discount_t'][:2] = 0.0, 0.0  # all mass on the atom at 0
  batch['r_t'][2] = 5.0  # target atoms far beyond v_max: clipped
  online = _copy(agent.state.online_params)
  target = _copy(_make_agent(cls=RainbowAgent, num_atoms=11, noisy=False,
                             seed=3).state.online_params)  # another init
  state = agent.state.replace(target_params=_copy(target))
  _, metrics = agent.train_step(_copy(state), batch)

  support = np.linspace(-10.0, 10.0, 11)
  logits = lambda params, obs: np.asarray(
      agent.network.apply({'params': params}, obs).logits, np.float64)
  rows = np.arange(8)
  log_p_tm1 = _log_softmax(logits(online, batch['obs_tm1'])[rows, batch['a_tm1']])
  probs_t = np.exp(_log_softmax(logits(target, batch['obs_t'])))  # [B, A, N]
  online_q_t = (np.exp(_log_softmax(logits(online, batch['obs_t']))) * support).sum(-1)
  target_q_t = (probs_t * support).sum(-1)

  def cross_entropy(a_t):
    target_support = (batch['r_t'][:, None].astype(np.float64)
                      + batch['discount_t'][:, None] * support[None])
    projected = _c51_projection(target_support, probs_t[rows, a_t], support)
    np.testing.assert_allclose(projected.sum(-1), 1.0, rtol=1e-9)
    return -(projected * log_p_tm1).sum(-1)  # [B]

  ce = cross_entropy(online_q_t.argmax(-1))  # double DQN: the online net picks
  # The choice matters here: the target net's own argmax gives other losses.
  changed = online_q_t.argmax(-1) != target_q_t.argmax(-1)
  assert changed.any()
  assert not np.allclose(cross_entropy(target_q_t.argmax(-1))[changed],
                         ce[changed], rtol=1e-3)

  priorities = np.asarray(metrics['priorities'])
  assert priorities.shape == (8,)
  np.testing.assert_allclose(priorities, np.sqrt(ce + 1e-10), rtol=1e-5)
  weights = 1 / np.sqrt(batch['sampling_probabilities'].astype(np.float64))
  weights /= weights.max()
  want = np.mean(weights * ce)
  assert not np.isclose(want, ce.mean(), rtol=1e-2)  # the weights matter here
  np.testing.assert_allclose(float(metrics['td_loss']), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-5)


def test_noisy_nets_are_deterministic_in_eval_and_noisy_in_training():
  agent = _make_agent(cls=RainbowAgent, num_atoms=11, epsilon_eval=0.0,
                      epsilon_train=0.0)
  obs = np.random.default_rng(7).normal(size=(256, OBS_DIM)).astype(np.float32)
  params = agent.state.online_params

  agent.eval_mode = True
  assert agent.epsilon() == 0.0
  eval_actions = [agent.select_actions(obs) for _ in range(4)]  # new key each
  for actions in eval_actions[1:]:
    np.testing.assert_array_equal(actions, eval_actions[0])
  for seed in range(3):
    np.testing.assert_array_equal(
        np.asarray(agent._select_action(params, obs, jax.random.PRNGKey(seed),
                                        0.0, deterministic=True)),
        eval_actions[0])

  agent.eval_mode = False
  q = [np.asarray(agent.network.apply({'params': params}, obs,
                                      deterministic=False,
                                      rngs={'noise': jax.random.PRNGKey(s)}
                                      ).q_values) for s in range(2)]
  assert not np.allclose(q[0], q[1])
  q_det = [np.asarray(agent.network.apply({'params': params}, obs,
                                          deterministic=True,
                                          rngs={'noise': jax.random.PRNGKey(s)}
                                          ).q_values) for s in range(2)]
  np.testing.assert_array_equal(q_det[0], q_det[1])
  train_actions = [agent.select_actions(obs) for _ in range(2)]
  assert not np.array_equal(train_actions[0], train_actions[1])


# -- Replay ratio ------------------------------------------------------------------


@pytest.mark.parametrize('num_envs', [1, 2, 8])
def test_record_keeps_one_update_per_update_period_agent_steps(num_envs):
  warmup = 48
  agent = _make_agent(num_envs=num_envs, min_replay_history=warmup,
                      update_period=4)
  rng = np.random.default_rng(8)
  total_steps = 0
  for _ in range(448 // num_envs):
    obs = rng.normal(size=(num_envs, OBS_DIM)).astype(np.float32)
    agent.record(obs, rng.integers(0, NUM_ACTIONS, num_envs),
                 np.zeros(num_envs), np.zeros(num_envs, bool),
                 np.zeros(num_envs, bool))
    total_steps += num_envs
    if total_steps <= warmup:
      assert int(agent.state.step) == 0
  assert agent.training_steps == total_steps == 448
  # Training starts once more than `warmup` transitions are stored; from then
  # on every update_period agent steps (over all envs) give one update:
  # (448 - 48) / 4 = 100 gradient steps, whatever the number of envs (with 8
  # envs, two updates are due per call).
  assert int(agent.state.step) == (total_steps - warmup) / 4 == 100
  assert agent.pop_metrics()['loss'] > 0


def test_record_counts_only_active_envs():
  agent = _make_agent(num_envs=2, min_replay_history=10**6)
  obs = np.zeros((2, OBS_DIM), np.float32)
  agent.record(obs, np.array([0, 1]), np.zeros(2), np.zeros(2, bool),
               np.zeros(2, bool), active=np.array([True, False]))
  assert agent.training_steps == 1
  agent.record(obs, np.array([0, 1]), np.zeros(2), np.zeros(2, bool),
               np.zeros(2, bool))
  assert agent.training_steps == 3


def test_single_env_dopamine_interface_trains():
  agent = _make_agent(min_replay_history=20, update_period=1)
  rng = np.random.default_rng(9)
  for _ in range(3):
    action = agent.begin_episode(rng.normal(size=OBS_DIM).astype(np.float32))
    assert 0 <= action < NUM_ACTIONS
    for _ in range(15):
      action = agent.step(1.0, rng.normal(size=OBS_DIM).astype(np.float32))
      assert 0 <= action < NUM_ACTIONS
    agent.end_episode(1.0)
  assert agent.training_steps == 48
  assert agent.replay.add_count == 48
  # Updates once more than 20 records are stored: records 21..48.
  assert int(agent.state.step) == 48 - 20


# -- Async acting and the phase-local update schedule ------------------------------


def _assert_acting_has_its_own_device(devices):
  """`agents` asks JAX for two host devices on import: unconditional, so a
  broken device setup fails these tests instead of making them trivial."""
  assert len(jax.devices('cpu')) == devices.HOST_DEVICES
  assert devices.acting_device() != devices.learner_device()


def test_async_acting_acts_on_its_own_device_one_learner_call_stale():
  from agents import devices  # pylint: disable=g-import-not-at-top
  _assert_acting_has_its_own_device(devices)
  agent = _make_agent(async_acting=True, min_replay_history=16, update_period=4)
  rng = np.random.default_rng(4)
  _fill_replay(agent, 16, rng)
  agent.start_phase(eval_mode=False)
  obs = rng.normal(size=(1, OBS_DIM)).astype(np.float32)
  agent.select_actions(obs)
  assert agent._acting_params is not None
  leaf = jax.tree_util.tree_leaves(agent._acting_params)[0]
  assert leaf.devices() == {devices.acting_device()}
  learner_leaf = jax.tree_util.tree_leaves(agent.state.online_params)[0]
  assert learner_leaf.devices() == {devices.learner_device()}
  before = _copy(agent.state.online_params)
  _fill_replay(agent, 4, rng)  # one gradient step is due and dispatched
  assert int(agent.state.step) == 1
  # Acting uses the params from before that step, not the learner's new ones.
  assert _leaves_equal(agent._acting_params, before)
  assert not _leaves_equal(agent.state.online_params, before)
  agent.select_actions(obs)
  # The acting arrays alias the learner's buffers without a copy; later
  # learner calls must never write into them (the online params are never
  # donated), whatever acting still holds.
  held = agent._acting_params
  _fill_replay(agent, 8, rng)  # two more gradient steps
  assert int(agent.state.step) == 3
  assert _leaves_equal(held, before)
  assert not _leaves_equal(agent._acting_params, before)
  # A new phase acts with the current params.
  agent.start_phase(eval_mode=True)
  assert _leaves_equal(agent._acting_params, agent.state.online_params)


def test_pipeline_starts_the_next_update_and_acts_with_the_due_ones_params():
  from agents import devices  # pylint: disable=g-import-not-at-top
  _assert_acting_has_its_own_device(devices)
  agent = _make_agent(min_replay_history=16, update_period=4, replay_capacity=4000,
                      pipeline_updates=True)
  assert agent.pipeline_updates and agent.overlaps_learner
  rng = np.random.default_rng(9)
  _fill_replay(agent, 1000, rng)  # a replay the next draws rarely reach the end of
  agent.start_phase(eval_mode=False)
  _fill_replay(agent, 4, rng)  # one step due: run, and the next one started
  assert int(agent.state.step) == 1 + (1000 - 16) // 4
  lookahead = agent._lookahead
  assert lookahead is not None
  assert lookahead.due_at == (agent.replay.add_count + 4, 1)
  assert int(lookahead.state.step) == int(agent.state.step) + 1
  # Acting is exact: the params of every update due so far, on its own device.
  obs = rng.normal(size=(1, OBS_DIM)).astype(np.float32)
  agent.select_actions(obs)
  assert _leaves_equal(agent._acting_params, agent.state.online_params)
  leaf = jax.tree_util.tree_leaves(agent._acting_params)[0]
  assert leaf.devices() == {devices.acting_device()}
  learner_leaf = jax.tree_util.tree_leaves(agent.state.online_params)[0]
  assert learner_leaf.devices() == {devices.learner_device()}
  # Three records later nothing is due yet; the fourth takes the started step.
  _fill_replay(agent, 3, rng)
  assert agent._lookahead is lookahead
  _fill_replay(agent, 1, rng)
  assert _leaves_equal(agent.state.online_params, lookahead.state.online_params)
  # A new phase drops the step started next and puts the replay's generator
  # back to its state before that step's draw.
  started = agent._lookahead
  assert started is not None and started is not lookahead
  advanced = agent.replay.rng_state
  agent.start_phase(eval_mode=True)
  assert agent._lookahead is None
  assert agent.replay.rng_state == started.rng_state != advanced


@pytest.mark.parametrize('update_period', [4, 10])  # 1/10 is inexact in binary
def test_pipeline_predicts_the_record_its_update_falls_due_at(update_period):
  agent = _make_agent(min_replay_history=16, update_period=update_period,
                      replay_capacity=4000, pipeline_updates=True)
  rng = np.random.default_rng(update_period)
  _fill_replay(agent, 1000, rng)
  for _ in range(3):  # three due records in a row, each started ahead
    lookahead = agent._lookahead
    assert lookahead is not None
    steps = int(agent.state.step)
    while int(agent.state.step) == steps:
      _fill_replay(agent, 1, rng)
    assert lookahead.due_at == (agent.replay.add_count, 1)
    assert _leaves_equal(agent.state.online_params, lookahead.state.online_params)


def test_async_acting_is_reproducible():
  runs = []
  for _ in range(2):
    agent = _make_agent(async_acting=True, min_replay_history=16, update_period=2,
                        epsilon_decay_period=10)
    rng = np.random.default_rng(5)
    actions = []
    for t in range(60):
      obs = rng.normal(size=(1, OBS_DIM)).astype(np.float32)
      action = agent.select_actions(obs)
      actions.append(int(action[0]))
      agent.record(obs, action, rng.normal(size=1), np.array([t % 15 == 14]),
                   np.array([t % 15 == 14]))
    runs.append((actions, jax.device_get(agent.state.online_params)))
  assert runs[0][0] == runs[1][0]
  assert _leaves_equal(runs[0][1], runs[1][1])


def test_update_schedule_restarts_with_each_training_phase():
  agent = _make_agent(min_replay_history=8, update_period=4)
  rng = np.random.default_rng(6)
  _fill_replay(agent, 10, rng)  # credit 10 / 4 = 2.5: half a step left over
  steps = int(agent.state.step)
  agent.start_phase(eval_mode=False)  # drops it (else 2 more steps would train)
  _fill_replay(agent, 3, rng)
  assert int(agent.state.step) == steps  # 3 < 4 phase steps: nothing due yet
  _fill_replay(agent, 1, rng)
  assert int(agent.state.step) == steps + 1
