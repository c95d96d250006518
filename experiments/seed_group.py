"""Many seeds of one config in one process: `moerl train --num_seeds S`.

Each seed is a full `Runner` built exactly as if it ran alone (its own
environment, replay buffer, rngs and run directory `<base_dir>/seed<k>`, with
its own config.gin), so every seed's directory can be resumed, evaluated and
plotted like any run. What they share is the accelerator work: the learner
states are stacked on a leading seed axis, and action selection and gradient
steps run as one vmapped jitted call per device for the seeds on it (seeds
are spread over the host devices, see `SeedGroup`). Seeds advance in
lockstep, one env step each; a seed whose phase has ended waits for the
others (it takes no steps), so its replay and rngs are those of a lone run.
Since the update schedule restarts with each training phase (`DQNAgent`),
the seeds' gradient steps fall in the same rounds. Acting and updates are
serial, in Dopamine's order: `DQNAgent.pipeline_updates` applies to lone runs
(the group runs its seeds' updates itself), and `DQNAgent.async_acting` is
refused here.
"""

import os
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from agents import devices
from agents.metric_sums import MetricSums
from experiments.run_dir import RunDirError
from networks.expert_metrics import GRAM_KEY
from experiments.runner import Progress, Runner, start_line


def _split_evenly(count: int, parts: int) -> List[range]:
  bounds = np.linspace(0, count, parts + 1).round().astype(int)
  return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class _Shard:
  """The seeds on one device: their learner states and acting rngs, stacked
  on a leading seed axis, and their summed train-step metrics."""

  def __init__(self, seeds: range, device):
    self.seeds, self.device = seeds, device
    self.state = None  # TrainState, every leaf [k, ...]
    self.rngs = None  # [k, 2]
    self.metric_sums = MetricSums()  # weights [k]: 1 where a seed updated

  def gather(self, agents) -> None:
    host = lambda tree: jax.device_get(tree)
    stacked = lambda trees: jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)
    self.state = jax.device_put(
        stacked([host(agents[s].state) for s in self.seeds]), self.device)
    self.rngs = jax.device_put(np.stack([host(agents[s]._rng) for s in self.seeds]),
                               self.device)

  def scatter(self, agents) -> None:
    for j, s in enumerate(self.seeds):
      agents[s].state = jax.tree_util.tree_map(lambda x, j=j: x[j], self.state)
      agents[s]._rng = self.rngs[j]

  def accumulate(self, metrics, do_update) -> None:
    """Queues each seed's metrics (summed on device); split per iteration."""
    metrics = {k: v for k, v in metrics.items() if k != 'priorities'}
    gram = metrics.pop(GRAM_KEY, None)  # the newest of each updated seed
    self.metric_sums.add(metrics, do_update, latest=gram)

  def hand_metrics_to(self, agents) -> None:
    """Gives each agent its seed's sums, so pop_metrics works as alone."""
    for j, s in enumerate(self.seeds):
      agents[s].metric_sums = self.metric_sums.seed(j)
    self.metric_sums.clear()


class SeedGroup:
  """S runners trained in lockstep; see the module docstring.

  Seeds are spread evenly over the host devices (`agents.devices`: two CPU
  devices on a CPU-only machine, the accelerator otherwise); each device runs
  the vmapped acting and gradient steps of its seeds, concurrently with the
  other's.
  """

  def __init__(self, runners: Sequence[Runner]):
    if not runners:
      raise ValueError('a SeedGroup needs at least one runner.')
    self.runners = list(runners)
    self.agents = [r.agent for r in self.runners]
    for runner in self.runners:
      runner.label = f'seed {runner.seed}: '
    if any(agent.async_acting for agent in self.agents):
      raise ValueError('DQNAgent.async_acting applies to lone runs; a '
                       '--num_seeds group acts synchronously: unbind it, or '
                       'train the seeds one by one.')
    lead = self.agents[0]
    for agent in self.agents:
      agent.defer_updates = True
    train_step = lead.train_step_fn

    def masked_step(state, batch, do_update):
      new_state, metrics = train_step(state, batch)
      keep = lambda new, old: jnp.where(do_update, new, old)
      return jax.tree_util.tree_map(keep, new_state, state), metrics

    self._train = jax.jit(jax.vmap(masked_step), donate_argnums=0)
    select = lead._select_action  # jitted; vmapped here over seeds

    def act(params, observations, rng, epsilon, active, deterministic):
      # The key stream of a lone agent's select_actions; a waiting seed's rng
      # does not move.
      new_rng, key = jax.random.split(rng)
      actions = select(params, observations, key, epsilon,
                       deterministic=deterministic)
      return actions, jnp.where(active, new_rng, rng)

    self._act = jax.jit(jax.vmap(act, in_axes=(0, 0, 0, 0, 0, None)),
                        static_argnums=5)
    self._prioritized = lead._prioritized
    host = devices.host_devices()
    self.shards = [_Shard(seeds, host[i]) for i, seeds in
                   enumerate(_split_evenly(len(self.agents), len(host)))]

  # -- Learner state across seeds. ---------------------------------------------
  def gather_states(self) -> None:
    for shard in self.shards:
      shard.gather(self.agents)

  def scatter_states(self) -> None:
    """Gives every agent its own slice (for checkpoints and metrics)."""
    for shard in self.shards:
      shard.scatter(self.agents)

  # -- Acting and learning. ------------------------------------------------------
  def _select_actions(self, phases, eval_mode: bool) -> np.ndarray:
    dispatched = []
    for shard in self.shards:  # one call per device, running concurrently
      observations = np.stack([phases[s].observations for s in shard.seeds])
      active = np.array([not phases[s].done for s in shard.seeds])
      epsilons = np.array([self.agents[s].epsilon() for s in shard.seeds],
                          np.float32)
      actions, shard.rngs = self._act(shard.state.online_params, observations,
                                      shard.rngs, epsilons, active, eval_mode)
      dispatched.append(actions)
    return np.concatenate([np.asarray(a) for a in dispatched])  # [S, N]

  def _run_updates(self) -> None:
    pending = np.array([agent.pending_updates for agent in self.agents])
    for agent in self.agents:
      agent.pending_updates = 0
    while pending.max() > 0:
      due = pending > 0
      updated = []
      for shard in self.shards:
        do_update = due[shard.seeds.start:shard.seeds.stop]
        if not do_update.any():
          continue
        batches, indices = {}, {}
        for j in np.flatnonzero(do_update):
          batches[j] = self.agents[shard.seeds[j]].replay.sample()
          indices[j] = batches[j].pop('indices')
        filler = next(iter(batches.values()))  # for seeds with nothing due
        stacked = {k: np.stack([batches.get(j, filler)[k]
                                for j in range(len(shard.seeds))])
                   for k in filler}
        shard.state, metrics = self._train(shard.state, stacked, do_update)
        shard.accumulate(metrics, do_update)
        updated.append((shard, indices, metrics))
      if self._prioritized:
        for shard, indices, metrics in updated:
          priorities = np.asarray(metrics['priorities'])  # [k, B]
          for j, index in indices.items():
            self.agents[shard.seeds[j]].replay.update_priorities(
                index, priorities[j])
      pending = pending - due

  def _run_phases(self, envs, min_steps: int, eval_mode: bool,
                  iteration: int) -> List[Dict[str, Any]]:
    phases = [runner.new_phase(env, min_steps, eval_mode, iteration)
              for runner, env in zip(self.runners, envs)]
    label = 'eval' if eval_mode else 'train'
    progress = Progress(min_steps * len(phases),
                        f'iter {iteration} {label} x{len(phases)} seeds',
                        self.runners[0]._log_stream)
    try:
      while not all(phase.done for phase in phases):
        actions = self._select_actions(phases, eval_mode)
        counted = 0
        for phase, seed_actions in zip(phases, actions):
          if not phase.done:
            counted += phase.step(seed_actions)
        if not eval_mode:
          self._run_updates()
        progress.update(counted, phases[0].recent_return)
    finally:
      progress.close()
      for phase in phases:
        phase.close()
    return [phase.stats() for phase in phases]

  def run_iteration(self, iteration: int) -> List[Dict[str, Any]]:
    train = self._run_phases([r.env for r in self.runners],
                             self.runners[0].training_steps, False, iteration)
    evaluation = [None] * len(self.runners)
    if self.runners[0].schedule == 'continuous_train_and_eval':
      evaluation = self._run_phases([r.eval_env() for r in self.runners],
                                    self.runners[0].evaluation_steps, True,
                                    iteration)
    self.scatter_states()
    for shard in self.shards:
      shard.hand_metrics_to(self.agents)
    return [runner.iteration_metrics(iteration, t, e)
            for runner, t, e in zip(self.runners, train, evaluation)]

  # -- The experiment. -----------------------------------------------------------
  def run_experiment(self, operative_configs: Sequence[str]) -> None:
    """Runs (or resumes) all seeds; they resume from a common iteration."""
    # Every seed's directory is held before any seed's is read or written, so
    # a group refused for one seed (another process trains in it) writes none.
    for runner in self.runners:
      runner.lock_run_dir()
    # A group killed between two seeds' checkpoints has seeds one iteration
    # ahead: every seed resumes from the newest checkpoint they all have (or
    # starts afresh); an ahead seed's newer line and checkpoint are replaced.
    starts = [runner.open_run(config, restore=False)
              for runner, config in zip(self.runners, operative_configs)]
    iteration = min(starts)
    for runner, start in zip(self.runners, starts):
      if start > iteration + 1:  # not a kill mid-round: another run's seeds
        raise RunDirError(
            f'{runner.base_dir} is {start - iteration} iterations ahead of the '
            'other seeds (a group checkpoints all its seeds each iteration); '
            'use a new --base_dir or the seeds\' own commands.')
    if iteration > 0:
      for runner in self.runners:
        runner.restore_checkpoint(iteration - 1)
    num_iterations = self.runners[0].num_iterations
    lead = self.runners[0]
    print(f'{len(self.runners)} seeds, ' + start_line(
        os.path.dirname(lead.base_dir), iteration, num_iterations,
        lead.training_steps), file=lead._log_stream, flush=True)
    for runner in self.runners:
      runner.start_logging(iteration)
    self.gather_states()
    try:
      while iteration < num_iterations:
        for runner, metrics in zip(self.runners, self.run_iteration(iteration)):
          runner.finish_iteration(metrics)
        iteration += 1
    except BaseException as e:
      for runner in self.runners:
        runner.end_run(iteration, e)
      raise
    for runner in self.runners:
      runner.end_run(iteration, None)

  def close(self) -> None:
    for runner in self.runners:
      runner.close()
