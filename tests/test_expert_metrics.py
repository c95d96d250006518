"""Training-time expert metrics: values, ranges, and a short run writing them."""

import json

import gin
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gin_config
from experiments.runner import Runner
from networks import expert_metrics as em
from networks.q_network import NetworkOutput


def test_srank_from_gram_hand_spectrum():
  # F = U diag(10, 5, 1, 0.01) V^T: cumulative shares of the singular values
  # 0.625, 0.937, 0.9994, 1 -> 3 reach 99%, 2 reach 90%.
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(32, 4)))
  v, _ = np.linalg.qr(rng.normal(size=(40, 4)))
  features = u @ np.diag([10.0, 5.0, 1.0, 0.01]) @ v.T  # [32, 40]
  assert em.srank_from_gram(features @ features.T) == 3
  assert em.srank_from_gram(features @ features.T, delta=0.1) == 2
  assert em.srank_from_gram(np.zeros((4, 4))) == 0  # all features dead
  diverged = features @ features.T
  diverged[0, 1] = np.nan
  assert np.isnan(em.srank_from_gram(diverged))  # logged as null, not a crash


def test_dormant_fraction_hand_case():
  # 1 expert, 4 units: mean |activation| 0, 1, 1, 2 -> normalised 0, 1, 1, 2.
  hidden = jnp.array([0.0, 1.0, 1.0, 2.0]).reshape((1, 1, 1, 4))
  assert float(em.dormant_fraction(hidden, 0.0)[0]) == 0.25
  # tau 0.1 also only catches the silent unit; tau 1.0 catches three.
  assert float(em.dormant_fraction(hidden, 0.1)[0]) == 0.25
  assert float(em.dormant_fraction(hidden, 1.0)[0]) == 0.75


def _output(**diagnostics):
  features = jnp.ones((2, 3))
  return NetworkOutput(q_values=None, logits=None, probabilities=None,
                       features=features, diagnostics=diagnostics, aux_loss=None)


def test_soft_moe_entropies_and_shares_hand_cases():
  b, t, e, s = 2, 3, 4, 2
  # Uniform weights: a token's combine weights spread over all E*S slots, a
  # slot's dispatch weights over all T tokens.
  uniform = em.expert_metrics(_output(
      combine_weights=jnp.full((b, t, e, s), 1 / (e * s)),
      dispatch_weights=jnp.full((b, t, e, s), 1 / t)))
  assert float(uniform['moe/combine_entropy']) == pytest.approx(np.log(e * s))
  assert float(uniform['moe/dispatch_entropy']) == pytest.approx(np.log(t))
  np.testing.assert_allclose(uniform['moe/expert_share'], np.full(e, 1 / e))
  # One-hot weights: every token combines slot (expert 1, slot 0) alone, every
  # slot reads token 0 alone: zero entropy, all the combine mass on expert 1.
  combine = np.zeros((b, t, e, s))
  combine[:, :, 1, 0] = 1
  dispatch = np.zeros((b, t, e, s))
  dispatch[:, 0] = 1
  one_hot = em.expert_metrics(_output(combine_weights=jnp.asarray(combine),
                                      dispatch_weights=jnp.asarray(dispatch)))
  assert float(one_hot['moe/combine_entropy']) == pytest.approx(0, abs=1e-6)
  assert float(one_hot['moe/dispatch_entropy']) == pytest.approx(0, abs=1e-6)
  np.testing.assert_allclose(one_hot['moe/expert_share'], [0, 1, 0, 0])


def test_router_entropy_hand_cases():
  b, t, e = 2, 5, 4
  mask = np.zeros((b, t, e, 1))  # [B, T, E, capacity]: token i to expert i % E
  for i in range(t):
    mask[:, i, i % e, 0] = 1
  for probs, want in ((np.full((b, t, e), 1 / e), np.log(e)),
                      (np.eye(e)[np.arange(t) % e][None].repeat(b, 0), 0.0)):
    metrics = em.expert_metrics(_output(router_probs=jnp.asarray(probs),
                                        dispatch_mask=jnp.asarray(mask),
                                        dropped_fraction=jnp.zeros(())))
    assert float(metrics['moe/router_entropy']) == pytest.approx(want, abs=1e-6)
    # Tokens 0 and 4 go to expert 0: 2 of the 5 routed tokens.
    np.testing.assert_allclose(metrics['moe/expert_share'], [0.4, 0.2, 0.2, 0.2])


@pytest.mark.parametrize('config,extra', [
    ('cartpole_dqn_softmoe.gin', []),
    ('cartpole_dqn_softmoe.gin', ["QNetwork.penultimate = 'topk'",
                                  'TopKMoE.num_experts = 4',
                                  'TopKMoE.expert_hidden_units = 32',
                                  'TopKMoE.capacity_factor = 0.5']),
    ('cartpole_dqn_softmoe.gin', ["QNetwork.penultimate = 'expert_choice'",
                                  'ExpertChoiceMoE.num_experts = 4',
                                  'ExpertChoiceMoE.expert_hidden_units = 32']),
])
def test_short_moe_run_writes_expert_metrics(tmp_path, config, extra):
  gin_config.load([config], [
      'Runner.num_iterations = 1', 'Runner.training_steps = 500',
      "Runner.schedule = 'continuous_train'", 'DQNAgent.min_replay_history = 200',
      *extra])
  runner = Runner(str(tmp_path / 'run'))
  runner.run_experiment(gin.operative_config_str())
  line = json.loads(open(tmp_path / 'run' / 'metrics.jsonl').readline())
  shares = [line[f'moe/expert_share_{i}'] for i in range(4)]
  assert sum(shares) == pytest.approx(1.0, abs=1e-5)
  for key, value in line.items():
    if key.startswith(('moe/expert_share', 'moe/dormant', 'moe/dropped')):
      assert 0.0 <= value <= 1.0, key
  for tau in ('0', '0.1'):
    assert all(f'moe/dormant_{tau}_{i}' in line for i in range(4))
  assert line['moe/router_grad_norm'] > 0
  assert 1 <= line['moe/srank'] <= 128
  if 'topk' in str(extra):
    assert 0.0 < line['moe/dropped_fraction'] < 1.0  # capacity 0.5 overflows
  runner.close()
