"""End-to-end learning: DQN and Rainbow with Soft MoE solve CartPole-v1.

Each config runs iterations of 5,000 training steps plus an evaluation phase
(epsilon 0, no noise) with the shipped settings and seed 0 (Runner's
default), stopping as soon as the mean evaluation return reaches 150; the
budget is 10 iterations (50,000 agent steps).
"""

import numpy as np
import pytest

from agents.dqn_agent import DQNAgent
from agents.rainbow_agent import RainbowAgent
from experiments import gin_config
from experiments.runner import Runner

TARGET_RETURN = 150.0
MAX_ITERATIONS = 10


@pytest.mark.parametrize('config,agent_class', [
    ('cartpole_dqn_softmoe.gin', DQNAgent),
    ('cartpole_rainbow_softmoe.gin', RainbowAgent)])
def test_softmoe_agent_learns_cartpole(config, agent_class, tmp_path):
  gin_config.load([config], ['Runner.training_steps = 5000',
                             "Runner.schedule = 'continuous_train_and_eval'"])
  # The same agent before any training (same seed, so the same initial
  # network), evaluated as the phases evaluate: far from the target.
  untrained = Runner(None)
  try:
    initial = float(np.mean(untrained.evaluate_episodes(5)))
  finally:
    untrained.close()
  assert initial < TARGET_RETURN / 2, initial
  runner = Runner(str(tmp_path / 'run'))
  assert runner.seed == 0
  assert type(runner.agent) is agent_class  # pylint: disable=unidiomatic-typecheck
  assert runner.identity['penultimate'] == 'softmoe'
  history = []
  reached = None
  try:
    for iteration in range(MAX_ITERATIONS):
      metrics = runner.run_iteration(iteration)
      assert metrics['agent_steps'] == (iteration + 1) * 5000
      assert metrics['agent_steps_taken'] >= metrics['agent_steps']
      assert metrics['eval_episodes'] >= 1
      history.append(metrics['eval_episode_return_mean'])
      print(f"{config} iteration {iteration}: eval return "
            f"{metrics['eval_episode_return_mean']}", flush=True)
      if metrics['eval_episode_return_mean'] >= TARGET_RETURN:
        reached = iteration
        break
  finally:
    runner.close()
  print(f'{config}: eval returns per iteration {history}; reached '
        f'{TARGET_RETURN} at iteration {reached}')
  assert reached is not None, (
      f'{config} did not reach a mean evaluation return of {TARGET_RETURN} '
      f'within {MAX_ITERATIONS * 5000} agent steps: {history}')
  # Learning happened through training (the untrained agent scored `initial`).
  assert metrics['loss'] is not None
  print(f'{config}: untrained agent {initial}')
