"""The runner's phase on Atari: what ends an episode for the agent and for the logs."""

import io
import os
import re

import numpy as np

from experiments import cli, gin_config
from experiments import runner as runner_lib
from experiments.runner import Runner


def test_life_loss_ends_the_agents_episode_but_not_the_game():
  """DER's terminal_on_life_loss, as Dopamine runs it: a lost life is terminal
  in the replay and starts a new frame stack; the reported return is the
  whole game's (unclipped) score."""
  gin_config.load(['der.gin'], [
      "create_atari_environment.game_name = 'Breakout'",
      'RainbowAgent.min_replay_history = 100000',  # acting and recording only
      'RainbowAgent.replay_capacity = 5000', 'Runner.training_steps = 700'])
  runner = Runner(None)
  results = []
  step = runner.env.step

  def recording_step(actions):
    results.append(step(actions))
    return results[-1]

  runner.env.step = recording_step
  phase = runner.new_phase(runner.env, 700, False, 0)
  rng = np.random.default_rng(0)
  restarted_stacks = 0
  while not phase.done:
    phase.step(rng.integers(0, runner.env.num_actions, 1))
    if results[-1].life_lost[0]:  # a new stack: zeros then the new frame
      assert not phase.observations[0, ..., :-1].any()
      assert phase.observations[0, ..., -1].any()
      restarted_stacks += 1
  life_lost = np.array([r.life_lost[0] for r in results])
  game_over = np.array([r.terminated[0] for r in results])
  ended = np.array([r.episode_ends[0] for r in results])
  assert life_lost.sum() >= 4 and game_over.sum() >= 1 and restarted_stacks == life_lost.sum()
  # Returns: one per game, each the sum of that game's unclipped rewards.
  rewards = np.array([r.reward[0] for r in results])
  bounds = np.flatnonzero(ended) + 1
  games = [chunk.sum() for chunk in np.split(rewards, bounds)[:len(bounds)]]
  assert phase.returns == games
  # Replay: an episode boundary and a terminal at every lost life and game over.
  replay = runner.agent.replay
  stored = replay.add_count
  assert stored == len(results)
  store = replay._store  # pylint: disable=protected-access
  np.testing.assert_array_equal(store['episode_end'][:stored, 0], life_lost | ended)
  np.testing.assert_array_equal(store['terminal'][:stored, 0].astype(bool),
                                life_lost | game_over)
  runner.close()


def _readme_metrics_keys():
  readme = open(os.path.join(os.path.dirname(__file__), '..', 'README.md'),
                encoding='utf-8').read()
  start = readme.index('Every `metrics.jsonl` line holds')
  paragraph = readme[start:readme.index('`moerl plot` reads only', start)]
  return set(re.findall(r'`([a-z_]+)`', paragraph)) - {'metrics'}


def test_every_metrics_line_holds_the_readme_keys_even_before_any_update():
  keys = _readme_metrics_keys()
  assert {'loss', 'td_loss', 'aux_loss', 'q_mean', 'num_params', 'variant'} <= keys
  gin_config.load(['cartpole_dqn.gin'], [
      'Runner.training_steps = 50', "Runner.schedule = 'continuous_train'",
      'DQNAgent.min_replay_history = 1000'])  # no gradient step in this iteration
  runner = Runner(None)
  metrics = runner.run_iteration(0)
  runner.close()
  assert keys <= set(metrics), sorted(keys - set(metrics))
  assert all(metrics[k] is None for k in ('loss', 'td_loss', 'aux_loss', 'q_mean'))


def test_frame_skip_and_screen_size_are_gin_parameters():
  """Dopamine's AtariPreprocessing.frame_skip / .screen_size: the agent sees
  the configured frames and the logged frame count follows the frame skip."""
  gin_config.load(['dqn_softmoe.gin'], [
      'create_atari_environment.frame_skip = 2',
      'create_atari_environment.screen_size = 64',
      'DQNAgent.min_replay_history = 100000', 'DQNAgent.replay_capacity = 1000',
      'Runner.training_steps = 50', 'Runner.max_steps_per_episode = 60'])
  runner = Runner(None)
  try:
    assert runner.env.observation_shape == (64, 64)
    assert runner.agent.observation_shape == (64, 64)
    metrics = runner.run_iteration(0)
  finally:
    runner.close()
  assert metrics['frames'] == 2 * metrics['agent_steps'] == 100


def test_bad_frame_skip_is_refused_on_one_line(tmp_path, capsys):
  base_dir = str(tmp_path / 'run')
  code = cli.main(['train', '--base_dir', base_dir, '--gin_files', 'dqn.gin',
                   '--gin_bindings', 'create_atari_environment.frame_skip = 0'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and 'frame_skip' in err[0], err
  assert not os.path.exists(base_dir)


def test_progress_off_a_terminal_prints_plain_lines(monkeypatch):
  stream = io.StringIO()  # not a TTY: no bar
  monkeypatch.setattr(runner_lib.Progress, 'LINE_SECONDS', 0.0)
  progress = runner_lib.Progress(1000, 'iter 3 train', stream)
  progress.update(200, None)
  progress.update(300, -20.5)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2
  assert lines[0].startswith('iter 3 train: 200/1000 agent steps, ')
  assert lines[1].startswith('iter 3 train: 500/1000 agent steps, ')
  assert lines[1].endswith('steps/s, recent return -20.5')
  # With the default interval, a short phase prints nothing but its summary.
  monkeypatch.undo()
  quiet = io.StringIO()
  progress = runner_lib.Progress(1000, 'iter 0 train', quiet)
  progress.update(500, 1.0)
  assert quiet.getvalue() == ''
