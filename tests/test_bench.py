"""`moerl bench`: the command runs and reports what it measured (no timing is
asserted here; the figures belong to the bench itself)."""

import json

import jax

from experiments import bench, cli


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
  report = bench.format_report(results)
  for label, _, _ in bench.PROTOCOL_CASES:
    assert label in report
  assert '10.0% of wall time outside the gradient step' in report
  assert '0.40 ms' in report and '6.70 GiB' in report
  assert 'S=4: 1350 (1.50x)' in report
  assert 'agent 100 s, throughput 90 s' in report
  # `moerl bench --json` output read back (string keys) gives the same report.
  assert bench.format_report(json.loads(json.dumps(results))) == report
