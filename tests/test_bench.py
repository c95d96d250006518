"""`moerl bench`: the command runs and reports what it measured (no timing is
asserted here; the figures belong to the bench itself)."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench, cli
from moe_testing import assert_trees_equal


def test_bench_envs_section_json(capsys):
  assert cli.main(['bench', '--envs', '--quick', '--json']) == 0
  results = json.loads(capsys.readouterr().out)
  envs = results['envs']
  assert envs['single_env'] > 0 and envs['vector_8_envs'] > 0
  assert envs['vector_speedup'] == envs['vector_8_envs'] / envs['single_env']
  assert set(results['seconds']) == {'envs'} and results['seconds']['envs'] > 0
  assert results['device'] == jax.devices()[0].platform  # the same command runs on a GPU


def test_report_names_every_figure():
  row = {'agent_steps_per_second': 80.0, 'wall_seconds': 10.0, 'updates': 200,
         'isolated_update_ms': 45.0, 'share_outside_gradient_step': 0.1}
  results = {
      'device': 'cpu', 'jax': 'x', 'seconds': {'agent': 100.0, 'throughput': 90.0},
      'agent': {**{label: row for label, _, _ in bench.PROTOCOL_CASES},
                'prioritized_sample_ms': 0.4, 'replay_1m_peak_rss_gib': 6.7},
      'throughput': {'collection_1_env': 600.0, 'collection_8_envs': 1200.0,
                     'collection_speedup': 2.0, 'end_to_end_8_envs': row,
                     'seeds_cartpole': {1: 900.0, 2: 1000.0, 4: 1350.0}}}
  results['agent']['dqn_dense'] = dict(row, in_loop_update_ms=47.5)
  report = bench.format_report(results)
  for label, _, _ in bench.PROTOCOL_CASES:
    assert label in report
  assert '10.0% of wall time outside the gradient step' in report
  assert '200 updates of 47.5 ms in the loop, 45.0 ms isolated' in report
  assert '200 updates of 45.0 ms isolated' in report
  assert '0.40 ms' in report and '6.70 GiB' in report
  assert 'S=4: 1350 (1.50x)' in report
  assert 'agent 100 s, throughput 90 s' in report
  # `moerl bench --json` output read back (string keys) gives the same report.
  assert bench.format_report(json.loads(json.dumps(results))) == report


def test_protocol_run_times_learner_calls_in_the_loop_with_serial_updates():
  cartpole = ['DQNAgent.update_period = 4', "Runner.schedule = 'continuous_train'"]
  exact = bench._protocol_run('cartpole_dqn.gin', cartpole, 400)
  piped = bench._protocol_run('cartpole_dqn.gin', [*cartpole, bench.PIPELINED], 400)
  for row in (exact, piped):
    # The timed iteration's gradient steps: one per 4 agent steps; the phase
    # ends with its last episode, at most 200 steps (the cap) past 400.
    assert 400 // 4 <= row['updates'] <= (400 + 200) // 4
    assert 0.0 <= row['share_outside_gradient_step'] < 1.0
    assert row['isolated_update_ms'] > 0
  # Serial updates: the seconds of the timed iteration's learner calls (one per
  # gradient step, none of the isolated ones), a part of the wall time.
  assert exact['learner_calls'] == exact['updates']
  inside = exact['in_loop_update_ms'] * exact['updates'] / 1e3
  assert 0 < inside < exact['wall_seconds']
  assert abs(exact['share_outside_gradient_step'] - (1 - inside / exact['wall_seconds'])) < 1e-9
  # The pipeline overlaps the calls: only the isolated reference applies.
  assert 'in_loop_update_ms' not in piped


def test_timed_learner_calls_return_what_the_calls_return():
  import gin  # pylint: disable=g-import-not-at-top
  runner = bench._runner('cartpole_dqn.gin', ['DQNAgent.min_replay_history = 50'])
  try:
    agent = runner.agent
    for _ in range(60):
      agent.record(np.zeros((1, 4), np.float32), np.zeros(1, np.int32),
                   np.ones(1), np.zeros(1, bool), np.zeros(1, bool))
    batch = agent.replay.sample()
    batch.pop('indices')
    own_step = agent.train_step
    copy = lambda: jax.tree_util.tree_map(jnp.copy, agent.state)  # calls donate
    expected = agent.train_step(copy(), batch)
    timer = bench._LearnerCallTimer(agent)
    timed = agent.train_step(copy(), batch)  # the same call from the same state
    assert timer.calls == 1 and timer.seconds > 0
    assert_trees_equal(timed, expected)
    assert int(timed[0].step) == int(agent.state.step) + 1
    timer.stop()
    assert agent.train_step is own_step
  finally:
    runner.close()
    gin.clear_config()
