"""Vector envs, fused updates and many seeds per process (SeedGroup)."""

import json
import os

import numpy as np
import pytest

from experiments import cli, gin_config
from experiments.runner import Runner

CARTPOLE = ['Runner.training_steps = 600', 'DQNAgent.min_replay_history = 200',
            "Runner.schedule = 'continuous_train'", 'Runner.num_iterations = 1']


def test_vector_path_records_returns_and_boundaries_per_env():
  """8 CartPole envs: every episode return equals its length (reward 1 per
  step), and the replay never stacks or bootstraps across an env's episodes."""
  gin_config.load(['cartpole_dqn.gin'], CARTPOLE + [
      'Runner.num_envs = 4', 'DQNAgent.replay_capacity = 4000'])
  runner = Runner(None)
  phase = runner.new_phase(runner.env, 400, False, 0)
  lengths = np.zeros(4, int)
  episode_lengths = []
  while not phase.done:
    active = phase.active.copy()
    before = len(phase.returns)
    result_obs = phase.observations.copy()
    phase.step(runner.agent.select_actions(result_obs))
    lengths += active
    # Episodes that ended in this step, in env order, are the new returns.
    new = phase.returns[before:]
    ended = [i for i in range(4) if active[i] and (
        phase.running_return[i] == 0.0)]
    assert len(new) == len(ended)
    for i, value in zip(ended, new):
      assert value == lengths[i]  # CartPole pays 1 per step
      episode_lengths.append(lengths[i])
      lengths[i] = 0
  assert episode_lengths and phase.steps >= 400
  replay = runner.agent.replay
  replay.check_valid()
  batch = replay.sample(batch_size=256)
  # Rewards of single-step transitions are 1 (clipped CartPole reward), and
  # discount 0 exactly at terminals: a transition never spans two episodes.
  assert np.all(batch['r_t'] == 1.0)
  assert set(np.unique(batch['discount_t'])) <= {0.0, np.float32(0.99)}
  runner.close()


def test_replay_ratio_with_vector_envs_uses_fused_steps():
  gin_config.load(['cartpole_dqn.gin'], CARTPOLE + ['Runner.num_envs = 8'])
  runner = Runner(None)
  runner.run_iteration(0)
  agent = runner.agent
  warm = 200
  expected = (agent.training_steps - warm) // agent.update_period
  assert abs(int(agent.state.step) - expected) <= 2
  # Two updates are due per vector step (8 agent steps / 4): they run fused.
  assert agent.train_steps._cache_size() >= 1
  runner.close()


def _metrics(path):
  return [json.loads(line) for line in open(path)]


def test_seed_in_a_group_matches_the_same_seed_alone(tmp_path):
  bindings = CARTPOLE[:3] + ['Runner.num_iterations = 2']
  group_dir, alone_dir = str(tmp_path / 'group'), str(tmp_path / 'alone')
  args = ['train', '--gin_files', 'cartpole_dqn_softmoe.gin']
  for b in bindings:
    args += ['--gin_bindings', b]
  assert cli.main(args + ['--base_dir', group_dir, '--num_seeds', '2']) == 0
  assert cli.main(args + ['--base_dir', alone_dir,
                          '--gin_bindings', 'Runner.seed = 1']) == 0
  assert sorted(os.listdir(group_dir)) == ['seed0', 'seed1']
  # The seed's directory is exactly a lone run's: same config, resumable.
  assert (open(os.path.join(group_dir, 'seed1', 'config.gin')).read() ==
          open(os.path.join(alone_dir, 'config.gin')).read())
  grouped = _metrics(os.path.join(group_dir, 'seed1', 'metrics.jsonl'))
  alone = _metrics(os.path.join(alone_dir, 'metrics.jsonl'))
  assert grouped[0]['seed'] == 1 and len(grouped) == len(alone) == 2
  first_g, first_a = grouped[0], alone[0]
  timing = {'agent_steps_per_second', 'train_seconds'}
  for key in first_a:
    if key in timing:
      continue
    if isinstance(first_a[key], float):
      # vmapped and plain matmuls may differ in the last bits
      assert first_g[key] == pytest.approx(first_a[key], rel=1e-4, abs=1e-6), key
    else:
      assert first_g[key] == first_a[key], key
  # The two seeds of the group are different runs.
  other = _metrics(os.path.join(group_dir, 'seed0', 'metrics.jsonl'))[0]
  assert other['seed'] == 0 and other['loss'] != first_g['loss']


def test_num_seeds_rejects_zero(tmp_path, capsys):
  code = cli.main(['train', '--base_dir', str(tmp_path / 'x'), '--gin_files',
                   'cartpole_dqn.gin', '--num_seeds', '0'])
  assert code == 2
  assert 'num_seeds' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'x')
