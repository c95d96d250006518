"""Vector envs, fused updates and many seeds per process (SeedGroup)."""

import json
import os

import numpy as np
import pytest

from experiments import cli, gin_config
from experiments.runner import Runner
from moe_testing import assert_trees_equal

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
  # The replay's per-env boundaries: see the test below (stack 4, n = 3).
  runner.agent.replay.check_valid()
  runner.close()


STACK, HORIZON, GAMMA, ENVS = 4, 3, 0.99, 4


def _state(records, j):
  """The state at record j of one env's records (frame, action, reward,
  terminal, end): frames j-STACK+1..j, oldest first, [STACK, obs], zeros for
  those before the episode's first frame."""
  start = j
  while start > 0 and not records[start - 1][4]:
    start -= 1
  return np.stack([records[m][0] if m >= start else
                   np.zeros_like(records[j][0])
                   for m in range(j - STACK + 1, j + 1)])


def _reference_transition(records, k):
  """Brute force: None when record k is not a valid transition, else
  (obs_tm1, a_tm1, r_t, discount_t, obs_t, number of rewards in r_t)."""
  ret = 0.0
  for m in range(HORIZON):
    if k + m >= len(records):
      return None  # the window runs past what is stored
    _, _, reward, terminal, end = records[k + m]
    ret += GAMMA ** m * reward
    if end:  # a truncation (or an idle step) has nothing to bootstrap from
      return ((_state(records, k), records[k][1], ret, 0.0, None, m + 1)
              if terminal else None)
  if k + HORIZON >= len(records):
    return None
  return (_state(records, k), records[k][1], ret, GAMMA ** HORIZON,
          _state(records, k + HORIZON), HORIZON)


def test_vector_path_replay_matches_per_env_trajectories():
  """4 CartPole envs, stack 4, n = 3, episodes capped at 20 steps: every
  valid replay transition equals the one built from its own env's recorded
  trajectory (frames of that env and episode only, zeros before its start;
  clipped n-step returns that stop at the episode's end; discount 0 only
  at terminals; no transition through a truncation), across autoresets."""
  gin_config.load(['cartpole_dqn.gin'], [
      f'Runner.num_envs = {ENVS}', 'Runner.max_steps_per_episode = 20',
      f'DQNAgent.stack_size = {STACK}', f'DQNAgent.update_horizon = {HORIZON}',
      f'DQNAgent.gamma = {GAMMA}', 'DQNAgent.replay_capacity = 4000',
      'Runner.seed = 1',  # its envs idle long after the budget (below)
      'DQNAgent.min_replay_history = 1000000',  # acting (random) and recording
      'MLPEncoder.hidden_units = (16,)', 'DensePenultimate.hidden_units = 16'])
  runner = Runner(None)
  env = runner.env
  rng = np.random.default_rng(0)
  episode = np.zeros(ENVS, int)
  t_in_episode = np.zeros(ENVS, int)
  frames, actions, results = [], [], []  # frames[k]: what each env showed

  def tag(k):  # distinct, nonzero frames: (env, episode, step in it, k)
    return np.stack([np.arange(ENVS) + 1, episode + 1, t_in_episode + 1,
                     np.full(ENVS, k + 1)], axis=1).astype(np.float32)

  env_reset, env_step = env.reset, env.step

  def reset(seed=None):
    env_reset(seed=seed)
    frames.append(tag(-1))
    return frames[-1]

  def step(a):
    result = env_step(a)
    ends = result.episode_ends
    episode[ends] += 1
    t_in_episode[:] = np.where(ends, 0, t_in_episode + 1)
    # Rewards of both signs, some beyond [-1, 1], so clipping counts.
    reward = rng.choice([-2.5, -0.5, 0.25, 1.0, 3.0], ENVS).astype(np.float32)
    result = result._replace(observation=tag(len(results)), reward=reward)
    actions.append(np.array(a).copy())
    results.append(result)
    frames.append(result.observation)
    return result

  env.reset, env.step = reset, step
  phase = runner.new_phase(env, 200, False, 0)
  actives, acted_on = [], []
  while not phase.done:
    actives.append(phase.active.copy())
    acted_on.append(phase.observations.copy())  # [ENVS, obs, STACK]
    phase.step(runner.agent.select_actions(phase.observations))
  replay = runner.agent.replay
  replay.check_valid()
  steps = len(results)
  assert replay.add_count == steps and steps * ENVS < 4000  # nothing overwritten

  # Each env's records as the runner should store them: idle envs (after the
  # budget) store an empty one-step episode.
  per_env = []
  for i in range(ENVS):
    records = []
    for k in range(steps):
      r = results[k]
      if actives[k][i]:
        records.append((frames[k][i], int(actions[k][i]),
                        float(np.clip(r.reward[i], -1.0, 1.0)),
                        bool(r.terminated[i]), bool(r.episode_ends[i])))
      else:
        records.append((np.zeros(4, np.float32), 0, 0.0, False, True))
    per_env.append(records)
    # The agent acted on the same stacks (its FrameStacker) while active.
    for k in range(steps):
      if actives[k][i]:
        np.testing.assert_array_equal(acted_on[k][i].T, _state(records, k),
                                      err_msg=(i, k))
  expected = {}
  for i in range(ENVS):
    for k in range(steps):
      transition = _reference_transition(per_env[i], k)
      if transition is not None:
        expected[k * ENVS + i] = transition  # flat id: slot * num_envs + env
  np.testing.assert_array_equal(replay.valid_indices(), sorted(expected))

  batch = replay.sample(indices=np.array(sorted(expected)))
  drawn = replay.sample(batch_size=512)
  for b in (batch, drawn):
    assert b['obs_tm1'].shape[1:] == (STACK, 4)  # stored frame-first
    for row, flat in enumerate(b['indices']):
      obs_tm1, a_tm1, r_t, discount_t, obs_t, _ = expected[int(flat)]
      where = (int(flat) % ENVS, int(flat) // ENVS)  # (env, step)
      np.testing.assert_array_equal(b['obs_tm1'][row], obs_tm1, err_msg=where)
      assert b['a_tm1'][row] == a_tm1, where
      assert b['r_t'][row] == pytest.approx(r_t, rel=1e-6, abs=1e-6), where
      assert b['discount_t'][row] == pytest.approx(discount_t, rel=1e-6), where
      if obs_t is not None:  # arbitrary when discount is 0
        np.testing.assert_array_equal(b['obs_t'][row], obs_t, err_msg=where)

  # The comparison covered what matters: ends at different steps per env,
  # truncations and terminals, windows cut by a terminal after >= 1 reward,
  # stacks padded at an episode start right after another episode's end.
  ends = np.array([r.episode_ends for r in results])
  truncated = np.array([r.truncated for r in results])
  terminated = np.array([r.terminated for r in results])
  assert ends.sum(0).min() >= 3 and truncated.any() and terminated.any()
  assert len({tuple(np.flatnonzero(ends[:, i])) for i in range(ENVS)}) == ENVS
  idle = (~np.array(actives)).sum(0)
  assert (idle >= 2 * HORIZON).sum() >= 2, idle  # idle steps are never sampled
  values = list(expected.values())
  assert sum(v[3] == 0.0 and v[5] > 1 for v in values) >= 10  # cut windows
  assert sum(v[3] > 0 for v in values) >= 100
  padded = [flat for flat, v in expected.items()
            if flat >= ENVS and not v[0][0].any()]  # slot k > 0
  assert len(padded) >= 20
  assert len(set(np.asarray(drawn['indices']) % ENVS)) == ENVS
  assert np.any(drawn['discount_t'] == 0.0)
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


@pytest.mark.parametrize('gin_file,num_envs', [
    ('cartpole_dqn.gin', 1),
    ('cartpole_dqn_softmoe.gin', 1),
    ('cartpole_dqn.gin', 4),  # fused pairs; idle envs at a phase's end
])
def test_pipelined_updates_give_the_serial_runs_numbers(gin_file, num_envs):
  """The pipeline (updates drawn ahead and started early) only overlaps work:
  every metric, the final learner state and the replay's generator equal a run
  that samples and updates in Dopamine's order."""
  runs = {}
  for pipeline in (True, False):
    gin_config.load([gin_file], CARTPOLE + [
        f'Runner.num_envs = {num_envs}', f'DQNAgent.pipeline_updates = {pipeline}'])
    runner = Runner(None)
    agent = runner.agent
    drawn_ahead = []
    sample_ahead = agent.replay.sample_ahead
    def counting(*args, sample_ahead=sample_ahead, drawn_ahead=drawn_ahead):
      batches = sample_ahead(*args)
      drawn_ahead.append(batches is not None)
      return batches
    agent.replay.sample_ahead = counting
    metrics = [runner.run_iteration(i) for i in range(2)]
    agent.checkpoint_state()  # drops a lookahead, putting the generator back
    runs[pipeline] = (metrics, agent, sum(drawn_ahead))
    runner.close()
  (piped, agent, ahead), (serial, serial_agent, serial_ahead) = runs[True], runs[False]
  for a, b in zip(piped, serial):
    for key in a:
      if key not in ('agent_steps_per_second', 'train_seconds'):
        assert a[key] == b[key], key
  updates = int(agent.state.step)
  assert updates == int(serial_agent.state.step) > 100
  assert_trees_equal(agent.state, serial_agent.state)
  assert agent.replay.rng_state == serial_agent.replay.rng_state
  # The pipeline ran: about a third of the updates were drawn ahead here (a
  # batch of 128 from a few hundred records often reads the newest rows; from
  # Atari's 20,000 and more with batch 32, few draws are refused).
  assert serial_ahead == 0 and ahead > 0.2 * updates


def _metrics(path):
  return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize('gin_file,num_seeds', [
    ('cartpole_dqn_softmoe.gin', 2),  # one seed per device
    # Prioritized replay; seed 1 shares its device (a vmapped pair) with seed 0.
    ('cartpole_rainbow_softmoe.gin', 3),
])
def test_seed_in_a_group_matches_the_same_seed_alone(tmp_path, gin_file,
                                                      num_seeds, capsys):
  agent = 'RainbowAgent' if 'rainbow' in gin_file else 'DQNAgent'
  bindings = [CARTPOLE[0], f'{agent}.min_replay_history = 200', CARTPOLE[2],
              'Runner.num_iterations = 2']
  group_dir, alone_dir = str(tmp_path / 'group'), str(tmp_path / 'alone')
  args = ['train', '--gin_files', gin_file]
  for b in bindings:
    args += ['--gin_bindings', b]
  assert cli.main(args + ['--base_dir', group_dir,
                          '--num_seeds', str(num_seeds)]) == 0
  printed = capsys.readouterr().err  # each seed's summary line says whose it is
  for seed in range(num_seeds):
    assert f'seed {seed}: iteration 1: agent_steps=' in printed, printed
  assert cli.main(args + ['--base_dir', alone_dir,
                          '--gin_bindings', 'Runner.seed = 1']) == 0
  assert sorted(os.listdir(group_dir)) == [f'seed{s}' for s in range(num_seeds)]
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


def _train_args(gin_file, bindings):
  args = ['train', '--gin_files', gin_file]
  for b in bindings:
    args += ['--gin_bindings', b]
  return args


def _without_timing(rows):
  return [{k: v for k, v in row.items()
           if k not in ('agent_steps_per_second', 'train_seconds')} for row in rows]


def test_group_killed_between_seed_checkpoints_of_iteration_0_resumes(tmp_path):
  """A group killed after seed0 but before seed1 saved iteration 0 leaves
  seed0 ahead with no common checkpoint: the rerun starts both seeds afresh
  and ends exactly where an uninterrupted group ends."""
  bindings = CARTPOLE[:3] + ['MLPEncoder.hidden_units = (32,)',
                             'DensePenultimate.hidden_units = 32']
  args = _train_args('cartpole_dqn.gin', bindings + ['Runner.num_iterations = 2'])
  clean, killed = str(tmp_path / 'clean'), str(tmp_path / 'killed')
  assert cli.main(args + ['--base_dir', clean, '--num_seeds', '2']) == 0
  # The state the kill leaves: seed0 finished iteration 0 (its checkpoint and
  # metrics line), seed1 has nothing. Seed0 trained alone writes exactly that.
  assert cli.main(_train_args('cartpole_dqn.gin', bindings + [
      'Runner.num_iterations = 1', 'Runner.seed = 0']) +
                  ['--base_dir', os.path.join(killed, 'seed0')]) == 0
  assert cli.main(args + ['--base_dir', killed, '--num_seeds', '2']) == 0
  for seed in ('seed0', 'seed1'):
    got = _metrics(os.path.join(killed, seed, 'metrics.jsonl'))
    expected = _metrics(os.path.join(clean, seed, 'metrics.jsonl'))
    assert [r['iteration'] for r in got] == [0, 1]
    assert _without_timing(got) == _without_timing(expected), seed


def test_group_refuses_async_acting_without_writing(tmp_path, capsys):
  base_dir = str(tmp_path / 'g')
  code = cli.main(_train_args('cartpole_dqn.gin', CARTPOLE + [
      'DQNAgent.async_acting = True']) + ['--base_dir', base_dir, '--num_seeds', '2'])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'async_acting' in err[0]
  assert not os.path.exists(base_dir)


def test_group_refuses_a_seed_more_than_one_iteration_ahead(tmp_path, capsys):
  """Not what a kill leaves (a group checkpoints every seed each iteration):
  restarting the other seeds would wipe that seed's finished iterations."""
  bindings = CARTPOLE[:3] + ['MLPEncoder.hidden_units = (32,)',
                             'DensePenultimate.hidden_units = 32',
                             'Runner.num_iterations = 2']
  base_dir = str(tmp_path / 'g')
  seed0 = os.path.join(base_dir, 'seed0')
  assert cli.main(_train_args('cartpole_dqn.gin', bindings + ['Runner.seed = 0']) +
                  ['--base_dir', seed0]) == 0
  before = {name: open(os.path.join(seed0, name), 'rb').read()
            for name in ('metrics.jsonl', 'config.gin')}
  capsys.readouterr()
  code = cli.main(_train_args('cartpole_dqn.gin', bindings) +
                  ['--base_dir', base_dir, '--num_seeds', '2'])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'ahead' in err[0], err
  assert {name: open(os.path.join(seed0, name), 'rb').read() for name in before} == before
  assert sorted(os.listdir(os.path.join(seed0, 'checkpoints'))) == ['ckpt_0', 'ckpt_1']
