"""Many seeds of one config in one process: `moerl train --num_seeds S`.

Each seed is a full `Runner` built exactly as if it ran alone (its own
environment, replay buffer, rngs and run directory `<base_dir>/seed<k>`, with
its own config.gin), so every seed's directory can be resumed, evaluated and
plotted like any run. What they share is the accelerator work: the learner
states are stacked on a leading seed axis, and action selection and gradient
steps run as one vmapped jitted call for all seeds. Seeds advance in
lockstep, one env step each; a seed whose phase has ended waits for the
others (it takes no steps), so its replay and rngs are those of a lone run.
"""

import functools
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.run_dir import RunDirError
from networks.expert_metrics import GRAM_KEY
from experiments.runner import Progress, Runner


def _stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _seed_mask(mask, x):
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


@jax.jit
def _masked(tree, mask):
  return jax.tree_util.tree_map(lambda x: x * _seed_mask(mask, x), tree)


@jax.jit
def _masked_add(sums, tree, mask):
  return jax.tree_util.tree_map(lambda a, x: a + x * _seed_mask(mask, x),
                                sums, tree)


@jax.jit
def _where_seed(mask, new, old):
  return jnp.where(_seed_mask(mask, new), new, old)


class SeedGroup:

  def __init__(self, runners: Sequence[Runner]):
    if not runners:
      raise ValueError('a SeedGroup needs at least one runner.')
    self.runners = list(runners)
    self.agents = [r.agent for r in self.runners]
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
    self._select = {
        flag: jax.jit(jax.vmap(functools.partial(select, deterministic=flag)))
        for flag in (False, True)}
    self._prioritized = lead._prioritized
    self.state = None
    self._reset_metrics()

  # -- Learner state across seeds. ---------------------------------------------
  def gather_states(self) -> None:
    self.state = _stack([agent.state for agent in self.agents])

  def scatter_states(self) -> None:
    """Gives every agent its own slice (for checkpoints and metrics)."""
    for s, agent in enumerate(self.agents):
      agent.state = jax.tree_util.tree_map(lambda x, s=s: x[s], self.state)

  # -- Acting and learning. ------------------------------------------------------
  def _select_actions(self, phases, eval_mode: bool) -> np.ndarray:
    keys, epsilons = [], []
    for agent, phase in zip(self.agents, phases):
      if phase.done:  # a waiting seed draws nothing: its rng stays a lone run's
        keys.append(jax.random.PRNGKey(0))
      else:
        agent._rng, key = jax.random.split(agent._rng)
        keys.append(key)
      epsilons.append(agent.epsilon())
    observations = np.stack([phase.observations for phase in phases])
    actions = self._select[eval_mode](self.state.online_params, observations,
                                      jnp.stack(keys), np.array(epsilons))
    return np.asarray(actions)  # [S, N]

  def _run_updates(self) -> None:
    pending = np.array([agent.pending_updates for agent in self.agents])
    for agent in self.agents:
      agent.pending_updates = 0
    while pending.max() > 0:
      do_update = pending > 0
      batches, indices = [None] * len(self.agents), [None] * len(self.agents)
      for s in np.flatnonzero(do_update):
        batches[s] = self.agents[s].replay.sample()
        indices[s] = batches[s].pop('indices')
      filler = batches[int(np.flatnonzero(do_update)[0])]
      batches = [filler if b is None else b for b in batches]
      stacked = {k: np.stack([b[k] for b in batches]) for k in filler}
      self.state, metrics = self._train(self.state, stacked, do_update)
      if self._prioritized:
        priorities = np.asarray(metrics['priorities'])  # [S, B]
        for s in np.flatnonzero(do_update):
          self.agents[s].replay.update_priorities(indices[s], priorities[s])
      self._accumulate(metrics, do_update)
      pending = pending - do_update

  def _accumulate(self, metrics, do_update) -> None:
    """Sums each seed's metrics on device (one call); split per iteration."""
    metrics = {k: v for k, v in metrics.items() if k != 'priorities'}
    gram = metrics.pop(GRAM_KEY, None)
    if gram is not None:  # the newest Gram matrix of each updated seed
      self._last_gram = (gram if self._last_gram is None
                         else _where_seed(do_update, gram, self._last_gram))
    if self._metric_sums is None:
      self._metric_sums = _masked(metrics, do_update)
    else:
      self._metric_sums = _masked_add(self._metric_sums, metrics, do_update)
    self._metric_counts += do_update

  def _hand_metrics_to_agents(self) -> None:
    """Gives each agent its seed's sums, so pop_metrics works as alone."""
    for s, agent in enumerate(self.agents):
      if self._metric_counts[s]:
        agent._metric_sums = jax.tree_util.tree_map(lambda x, s=s: x[s],
                                                    self._metric_sums)
        agent._metric_count = int(self._metric_counts[s])
        if self._last_gram is not None:
          agent._last_gram = self._last_gram[s]
    self._reset_metrics()

  def _reset_metrics(self) -> None:
    self._metric_sums, self._last_gram = None, None
    self._metric_counts = np.zeros(len(self.agents), np.int64)

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
    self._hand_metrics_to_agents()
    return [runner.iteration_metrics(iteration, t, e)
            for runner, t, e in zip(self.runners, train, evaluation)]

  # -- The experiment. -----------------------------------------------------------
  def run_experiment(self, operative_configs: Sequence[str]) -> None:
    """Runs (or resumes) all seeds; they resume from a common iteration."""
    starts = [runner.open_run(config)
              for runner, config in zip(self.runners, operative_configs)]
    iteration = min(starts)
    for runner, start in zip(self.runners, starts):
      if start != iteration:  # killed between two seeds' checkpoints
        if iteration == 0:
          raise RunDirError(
              f'{runner.base_dir} is ahead of the other seeds with no common '
              'checkpoint; delete the seed directories to start again.')
        runner.restore_checkpoint(iteration - 1)
    for runner in self.runners:
      runner.start_logging(iteration)
    self.gather_states()
    num_iterations = self.runners[0].num_iterations
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
