"""`moerl bench`: speed and memory figures, measured on this machine.

Figures are ratios measured in one run where possible (update cost of each
penultimate type relative to the dense baseline, share of wall time outside
the gradient step), since absolute times drift on shared machines. Nothing
here is asserted in tests. Sections:
  networks  jitted DQN update (Nature CNN, batch 32, Adam, 18 actions) per
            penultimate type, relative to dense; batch-1 action selection.
  agent     end-to-end DQN (dense and Soft MoE) at the Dopamine protocol on
            Pong (one env, update every 4 agent steps, batch 32), with the
            updates serial (Dopamine's order, the default) and pipelined, both
            exact: agent steps/s and the share of wall time outside the
            gradient step; prioritized replay sampling time; peak resident
            memory of a 1M-capacity buffer holding 1M frames.
  envs      ALE agent steps/s with random actions, one env and 8 vector envs.
  throughput  collection (batched acting + env + replay, no learning) with 8
            vector envs against one env; end to end with 8 vector envs at the
            protocol's replay ratio (fused updates), with its share of
            wall time outside the gradient step; total agent steps/s of S = 2, 4 seeds in one
            process (SeedGroup) on CartPole against a lone run (S = 1).
"""

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

SECTIONS = ('networks', 'agent', 'envs', 'throughput')

# name -> gin bindings on top of the Nature-CNN QNetwork.
NETWORK_VARIANTS = {
    'dense': ["QNetwork.penultimate = 'dense'"],
    'softmoe_8x16': ["QNetwork.penultimate = 'softmoe'", 'SoftMoE.num_experts = 8'],
    # The same layer with the training-time expert metrics (issue: <= 5% cost).
    'softmoe_8x16+metrics': ["QNetwork.penultimate = 'softmoe'",
                             'SoftMoE.num_experts = 8'],
    'softmoe_8x1': ["QNetwork.penultimate = 'softmoe'", 'SoftMoE.num_experts = 8',
                    'SoftMoE.slots_per_expert = 1'],
    'topk_8_k1': ["QNetwork.penultimate = 'topk'", 'TopKMoE.num_experts = 8'],
    'expert_choice_8': ["QNetwork.penultimate = 'expert_choice'",
                        'ExpertChoiceMoE.num_experts = 8'],
    'gap': ["QNetwork.penultimate = 'gap'"],
    'token_mlp': ["QNetwork.penultimate = 'token_mlp'"],
}


def _log(stream, message: str) -> None:
  if stream is not None:
    print(message, file=stream, flush=True)


def _network_update_fns(bindings: Sequence[str], batch_size: int = 32,
                        with_metrics: bool = False):
  """A jitted DQN train step and action selection for one network config."""
  from agents import dqn_agent, losses  # pylint: disable=g-import-not-at-top
  from networks.expert_metrics import expert_metrics  # pylint: disable=g-import-not-at-top
  import networks.q_network as qn  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin.parse_config(list(bindings))
  network = qn.QNetwork(num_actions=18)
  obs = jnp.asarray(np.random.default_rng(0).integers(
      0, 255, (batch_size, 84, 84, 4), dtype=np.uint8))
  params = network.init(jax.random.PRNGKey(0), obs[:1])['params']
  optimizer = dqn_agent.create_optimizer()
  state = dqn_agent.TrainState.create(params, optimizer, jax.random.PRNGKey(1))
  td = lambda *a: dqn_agent.dqn_td_loss(losses.mse_loss, *a)
  step = jax.jit(dqn_agent.make_train_step(
      network, optimizer, td, target_update_every=2000, double_dqn=False,
      prioritized=False, diagnostics_fn=expert_metrics if with_metrics else None),
      donate_argnums=0)
  batch = {'obs_tm1': obs, 'obs_t': obs,
           'a_tm1': jnp.zeros((batch_size,), jnp.int32),
           'r_t': jnp.ones((batch_size,)), 'discount_t': jnp.full((batch_size,), 0.99)}
  select = dqn_agent.make_select_action(network, 18)
  gin.clear_config()
  return state, step, batch, select, params, obs[:1], qn.count_parameters(params)


def bench_networks(repeats: int = 20, rounds: int = 3, stream=None) -> Dict[str, Any]:
  built = {name: _network_update_fns(b, with_metrics=name.endswith('+metrics'))
           for name, b in NETWORK_VARIANTS.items()}
  times = {name: [] for name in built}
  states = {}
  for name, (state, step, batch, *_rest) in built.items():  # compile + warm up
    for _ in range(3):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    states[name] = state
  for r in range(rounds):  # interleaved rounds so drift hits every variant
    for name, (_, step, batch, *_rest) in built.items():
      state = states[name]
      start = time.perf_counter()
      for _ in range(repeats):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      times[name].append((time.perf_counter() - start) / repeats)
      states[name] = state
    _log(stream, f'bench networks: round {r + 1}/{rounds} done')
  dense = float(np.median(times['dense']))
  rows = {}
  for name, (_, _, _, select, _, obs1, num_params) in built.items():
    params = states[name].online_params  # the built params were donated
    select(params, obs1, jax.random.PRNGKey(0), 0.0).block_until_ready()
    start = time.perf_counter()
    for i in range(200):
      np.asarray(select(params, obs1, jax.random.PRNGKey(i), 0.0))
    act_ms = (time.perf_counter() - start) / 200 * 1e3
    update = float(np.median(times[name]))
    rows[name] = {'update_ms': update * 1e3, 'relative_to_dense': update / dense,
                  'act_ms': act_ms, 'num_params': num_params}
  metrics_overhead = (rows['softmoe_8x16+metrics']['update_ms'] /
                      rows['softmoe_8x16']['update_ms'] - 1.0)
  return {'batch_size': 32, 'repeats': repeats * rounds, 'variants': rows,
          'expert_metrics_overhead': metrics_overhead}


def _isolated_update_seconds(agent, repeats: int = 10) -> float:
  """Median time of one gradient step as the loop runs it, on fixed replay
  batches from the host: one jitted step, or, where the loop fuses K > 1 due
  steps (uniform replay, K = num_envs // update_period), K fused steps / K.

  The steps run on the agent's own learner state, whose buffers the loop's
  steps use (donated in place, unless acting overlaps the learner), so both
  are timed on the same memory. They advance that state, which is harmless
  for the throwaway agents timed here. An update the pipeline started early
  is dropped first (with its draw put back), as a phase's end would.
  """
  agent.drop_lookahead()
  fused = max(1, agent.num_envs // agent.update_period)
  if agent._prioritized:  # pylint: disable=protected-access
    fused = 1  # prioritized steps run one by one (agents.dqn_agent)
  batches = [agent.replay.sample() for _ in range(fused)]
  for batch in batches:
    batch.pop('indices')
  if fused == 1:
    step, batch = agent.train_step, batches[0]
  else:
    step = agent.train_steps
    batch = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
  agent.state, metrics = step(agent.state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    agent.state, metrics = step(agent.state, batch)
    jax.block_until_ready((agent.state, metrics))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) / fused


# Short Pong episodes keep the end-of-phase overrun (episodes finish past the
# budget) small at bench budgets; the per-step work is the protocol's (a capped
# reset costs what a natural episode end does, about 4 ms).
SHORT_EPISODES = 'Runner.max_steps_per_episode = 200'


class _LearnerCallTimer:
  """Makes the agent's learner calls wait for their results, counting them
  and summing their seconds. Only for serial updates (no pipeline, no async
  acting), where the next action waits for each call anyway. `stop` restores
  the agent's own calls."""

  def __init__(self, agent):
    self.agent, self.calls, self.seconds = agent, 0, 0.0
    self._originals = (agent.train_step, agent.train_steps)
    agent.train_step, agent.train_steps = map(self._timed, self._originals)

  def _timed(self, call):
    def run(state, batch):
      start = time.perf_counter()
      out = jax.block_until_ready(call(state, batch))
      self.seconds += time.perf_counter() - start
      self.calls += 1
      return out
    return run

  def stop(self) -> None:
    self.agent.train_step, self.agent.train_steps = self._originals


def _protocol_run(gin_file: str, bindings: Sequence[str], steps: int) -> Dict[str, float]:
  """One timed training iteration after a warm-up one (replay past its
  200-transition min history, everything compiled).

  The share of wall time outside the gradient step: with serial updates,
  1 - (seconds inside the learner calls, timed in the loop) / wall time;
  where acting overlaps the calls (the pipeline, async acting), 1 - updates x
  (isolated update time) / wall time, the isolated time measured just before
  and just after the timed iteration (mean of the two medians).
  """
  runner = _runner(gin_file, [
      'DQNAgent.min_replay_history = 200', 'DQNAgent.replay_capacity = 100000',
      SHORT_EPISODES, f'Runner.training_steps = {steps}', 'Runner.num_iterations = 1',
      *bindings])
  agent = runner.agent
  runner.run_iteration(0)
  before = _isolated_update_seconds(agent)
  updates_before = int(agent.state.step)
  timer = None if agent.overlaps_learner else _LearnerCallTimer(agent)
  start = time.perf_counter()
  metrics = runner.run_iteration(1)
  jax.block_until_ready(agent.state)
  wall = time.perf_counter() - start
  if timer is not None:
    timer.stop()  # before the isolated steps below, which are not the loop's
  updates = int(agent.state.step) - updates_before
  update = (before + _isolated_update_seconds(agent)) / 2
  runner.close()
  row = {'agent_steps_per_second': metrics['agent_steps_per_second'],
         'wall_seconds': wall, 'updates': updates,
         'isolated_update_ms': update * 1e3}
  if timer is not None:
    row['learner_calls'] = timer.calls
    row['in_loop_update_ms'] = timer.seconds / max(updates, 1) * 1e3
    row['share_outside_gradient_step'] = _share_outside(timer.seconds, wall)
  else:
    row['share_outside_gradient_step'] = _share_outside(updates * update, wall)
  return row


def _share_outside(inside_seconds: float, wall_seconds: float) -> float:
  return max(0.0, 1.0 - inside_seconds / wall_seconds)


PIPELINED = 'DQNAgent.pipeline_updates = True'
PROTOCOL_CASES = (('dqn_dense', 'dqn.gin', []),
                  ('dqn_dense_pipelined', 'dqn.gin', [PIPELINED]),
                  ('dqn_softmoe', 'dqn_softmoe.gin', []),
                  ('dqn_softmoe_pipelined', 'dqn_softmoe.gin', [PIPELINED]))


def bench_agent(steps: int = 600, stream=None, memory: bool = True) -> Dict[str, Any]:
  """End-to-end DQN on Pong at the Dopamine protocol (one env, an update every
  4 agent steps, batch 32), with the updates serial (Dopamine's order, the
  default) and pipelined (`DQNAgent.pipeline_updates`: the next update drawn
  ahead and run while the agent acts); the same numbers either way."""
  result = {}
  for label, gin_file, extra in PROTOCOL_CASES:
    result[label] = _protocol_run(gin_file, extra, steps)
    _log(stream, f'bench agent: {label} done')
  # A pipelined run's reference update time is the mean of the isolated
  # measurements of both runs of its network (four medians, not two).
  for network in ('dqn_dense', 'dqn_softmoe'):
    serial, piped = result[network], result[network + '_pipelined']
    update_ms = (serial['isolated_update_ms'] + piped['isolated_update_ms']) / 2
    piped['isolated_update_ms'] = update_ms
    piped['share_outside_gradient_step'] = _share_outside(
        piped['updates'] * update_ms / 1e3, piped['wall_seconds'])
  gin.clear_config()
  result['prioritized_sample_ms'] = _bench_sampling()
  if memory:
    result['replay_1m_peak_rss_gib'] = _replay_memory_subprocess()
  return result


def _bench_sampling(fill: int = 50000) -> float:
  """Prioritized sample of 32 stacked transitions as the agent draws them
  (stacks frame-first; the agent moves the axis on the device)."""
  from agents.replay import PrioritizedReplayBuffer  # pylint: disable=g-import-not-at-top
  replay = PrioritizedReplayBuffer(observation_shape=(84, 84), stack_size=4,
                                   replay_capacity=1000000, batch_size=32,
                                   update_horizon=3, stack_axis_first=True)
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 255, (64, 1, 84, 84), dtype=np.uint8)
  for t in range(fill):
    replay.add(frames[t % 64], np.zeros(1, np.int32), np.zeros(1, np.float32),
               np.array([t % 1000 == 999]), np.array([t % 1000 == 999]))
  for _ in range(20):
    replay.sample()
  start = time.perf_counter()
  for _ in range(500):
    replay.sample()
  return (time.perf_counter() - start) / 500 * 1e3


_MEMORY_SCRIPT = r'''
import resource, numpy as np
from agents.replay import ReplayBuffer
replay = ReplayBuffer(observation_shape=(84, 84), stack_size=4, replay_capacity=1000000, batch_size=32)
frame = np.full((1, 84, 84), 7, np.uint8)
a, r, f = np.zeros(1, np.int32), np.zeros(1, np.float32), np.zeros(1, bool)
for t in range(1000000):
    replay.add(frame, a, r, f, f)
replay.sample()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)  # KiB -> GiB (Linux)
'''


def _replay_memory_subprocess() -> Optional[float]:
  out = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT], capture_output=True,
                       text=True, check=False, timeout=600)
  try:
    return float(out.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError):
    return None


def bench_envs(seconds: float = 5.0) -> Dict[str, Any]:
  from experiments.environments import create_atari_environment  # pylint: disable=g-import-not-at-top
  result = {}
  for label, n in (('single_env', 1), ('vector_8_envs', 8)):
    env = create_atari_environment('Pong', num_envs=n, num_threads=2)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      env.step(rng.integers(0, env.num_actions, n))
      steps += n
    result[label] = steps / (time.perf_counter() - start)
    env.close()
  result['vector_speedup'] = result['vector_8_envs'] / result['single_env']
  return result


def _runner(gin_file: str, bindings: Sequence[str]):
  from experiments import gin_config  # pylint: disable=g-import-not-at-top
  from experiments.runner import Runner  # pylint: disable=g-import-not-at-top
  gin_config.load([gin_file], list(bindings))
  return Runner(None, log_stream=open(os.devnull, 'w'))


def _collection_rate(num_envs: int, steps: int) -> float:
  """Agent steps/s of acting + env + replay writes (warm-up: no learning)."""
  runner = _runner('dqn_softmoe.gin', [
      f'Runner.num_envs = {num_envs}', 'DQNAgent.min_replay_history = 10000000',
      'DQNAgent.replay_capacity = 80000'])
  phase = runner.new_phase(runner.env, 10 ** 9, False, 0)  # never ends
  for _ in range(5):  # compile
    phase.step(runner.agent.select_actions(phase.observations))
  start, taken = time.perf_counter(), 0
  while taken < steps:
    taken += phase.step(runner.agent.select_actions(phase.observations))
  rate = taken / (time.perf_counter() - start)
  runner.close()
  return rate


def _lone_rate(gin_file: str, bindings: Sequence[str], steps: int) -> float:
  """Agent steps/s of one seed trained alone (what --num_seeds 1 runs)."""
  runner = _runner(gin_file, [*bindings, f'Runner.training_steps = {steps}'])
  runner.run_iteration(0)  # warm-up and compile
  rate = runner.run_iteration(1)['agent_steps_per_second']
  runner.close()
  return rate


def _seed_group_rate(gin_file: str, bindings: Sequence[str], num_seeds: int,
                     steps: int) -> float:
  """Total agent steps/s of `num_seeds` seeds trained in one SeedGroup."""
  from experiments.seed_group import SeedGroup  # pylint: disable=g-import-not-at-top
  runners = [_runner(gin_file, [*bindings, f'Runner.seed = {s}',
                                f'Runner.training_steps = {steps}'])
             for s in range(num_seeds)]
  group = SeedGroup(runners)
  group.gather_states()
  group.run_iteration(0)  # warm-up and compile
  before = sum(r.agent.training_steps for r in runners)
  start = time.perf_counter()
  group.run_iteration(1)
  taken = sum(r.agent.training_steps for r in runners) - before
  rate = taken / (time.perf_counter() - start)
  group.close()
  return rate


CARTPOLE_SEEDS = ["Runner.schedule = 'continuous_train'",
                  'DQNAgent.min_replay_history = 500']


def bench_throughput(quick: bool = False, stream=None) -> Dict[str, Any]:
  """Collection and end to end with 8 vector envs; S seeds in one process."""
  steps = 1000 if quick else 2000
  result = {'collection_1_env': _collection_rate(1, steps),
            'collection_8_envs': _collection_rate(8, steps)}
  result['collection_speedup'] = (result['collection_8_envs'] /
                                  result['collection_1_env'])
  _log(stream, 'bench throughput: collection done')
  # An 8-env phase runs until the last env's episode ends: shorter episodes.
  result['end_to_end_8_envs'] = _protocol_run(
      'dqn_softmoe.gin', ['Runner.num_envs = 8', 'Runner.max_steps_per_episode = 100'],
      steps // 2)
  _log(stream, 'bench throughput: end to end with 8 envs done')
  seeds = {1: _lone_rate('cartpole_dqn_softmoe.gin', CARTPOLE_SEEDS, steps)}
  for s in (2, 4):
    seeds[s] = _seed_group_rate('cartpole_dqn_softmoe.gin', CARTPOLE_SEEDS, s, steps)
  result['seeds_cartpole'] = seeds
  _log(stream, 'bench throughput: seeds done')
  gin.clear_config()
  return result


def run(sections: Optional[List[str]] = None, quick: bool = False,
        stream=None) -> Dict[str, Any]:
  """Runs the sections (all by default: under 5 minutes on 2 CPU cores;
  `quick` about half, without the 1M-frame memory probe)."""
  sections = sections or list(SECTIONS)
  results: Dict[str, Any] = {'device': jax.devices()[0].platform,
                             'jax': jax.__version__, 'seconds': {}}
  benches = {
      'networks': lambda: bench_networks(repeats=5 if quick else 10, rounds=2 if quick else 3,
                                         stream=stream),
      'agent': lambda: bench_agent(steps=300 if quick else 600, stream=stream,
                                   memory=not quick),
      'envs': lambda: bench_envs(seconds=1.0 if quick else 2.0),
      'throughput': lambda: bench_throughput(quick=quick, stream=stream),
  }
  for section in sections:
    start = time.perf_counter()
    results[section] = benches[section]()
    results['seconds'][section] = time.perf_counter() - start
  return results


def _share(row: Dict[str, float]) -> str:
  if 'in_loop_update_ms' in row:  # serial updates: learner calls timed in the loop
    how = (f"{row['updates']} updates of {row['in_loop_update_ms']:.1f} ms in the "
           f"loop, {row['isolated_update_ms']:.1f} ms isolated")
  else:
    how = f"{row['updates']} updates of {row['isolated_update_ms']:.1f} ms isolated"
  return (f"{row['agent_steps_per_second']:>6.0f} agent steps/s, "
          f"{100 * row['share_outside_gradient_step']:4.1f}% of wall time outside "
          f"the gradient step ({how}; {row['wall_seconds']:.1f} s)")


def format_report(results: Dict[str, Any]) -> str:
  lines = [f"device: {results['device']} (jax {results['jax']})"]
  if 'networks' in results:
    lines.append('\nJitted DQN update, Nature CNN, batch 32, Adam '
                 f"(median of {results['networks']['repeats']}); batch-1 action:")
    lines.append(f"{'penultimate':<22}{'params':>11}{'update ms':>11}"
                 f"{'x dense':>9}{'act ms':>9}")
    for name, row in results['networks']['variants'].items():
      lines.append(f"{name:<22}{row['num_params']:>11,}{row['update_ms']:>11.2f}"
                   f"{row['relative_to_dense']:>9.2f}{row['act_ms']:>9.2f}")
    lines.append('training-time expert metrics cost '
                 f"{100 * results['networks']['expert_metrics_overhead']:+.1f}% "
                 'of the Soft MoE update')
  if 'agent' in results:
    agent = results['agent']
    lines.append('\nEnd to end, Pong, Dopamine protocol (1 env, update every 4 steps, '
                 'batch 32), exact; updates serial (default) or pipelined:')
    for label, _, _ in PROTOCOL_CASES:
      lines.append(f'{label:<22} {_share(agent[label])}')
    lines.append(f"prioritized replay sample (batch 32, 1M capacity): "
                 f"{agent['prioritized_sample_ms']:.2f} ms")
    if agent.get('replay_1m_peak_rss_gib') is not None:
      lines.append('peak RSS, 1M-capacity buffer holding 1M frames: '
                   f"{agent['replay_1m_peak_rss_gib']:.2f} GiB")
  if 'envs' in results:
    env = results['envs']
    lines.append(f"\nALE Pong, random actions: {env['single_env']:.0f} agent steps/s "
                 f"single env, {env['vector_8_envs']:.0f} with 8 vector envs "
                 f"({env['vector_speedup']:.2f}x)")
  if 'throughput' in results:
    t = results['throughput']
    lines.append(f"\nCollection (batched acting + env + replay), Pong Soft MoE: "
                 f"{t['collection_1_env']:.0f} steps/s with 1 env, "
                 f"{t['collection_8_envs']:.0f} with 8 ({t['collection_speedup']:.2f}x)")
    lines.append("End to end, Pong Soft MoE, 8 vector envs, the protocol's replay ratio "
                 f"(fused updates): {_share(t['end_to_end_8_envs'])}")
    rates = {int(s): r for s, r in t['seeds_cartpole'].items()}  # JSON keys are strings
    lines.append('CartPole Soft MoE, total agent steps/s of S seeds in one process '
                 '(S=1: a lone run): ' + ', '.join(
                     f'S={s}: {r:.0f} ({r / rates[1]:.2f}x)' for s, r in rates.items()))
  if results.get('seconds'):
    lines.append('\nbench sections took ' + ', '.join(
        f'{name} {secs:.0f} s' for name, secs in results['seconds'].items()))
  return '\n'.join(lines)


if __name__ == '__main__':
  print(json.dumps(run(quick=True), indent=2))
