"""DQN (Mnih et al., 2015) in Dopamine's JAX style, with a functional core.

The core is three pure functions, jitted once per agent:
  select_action(params, observations[B, ...], rng, epsilon) -> actions[B]
  train_step(train_state, batch) -> (train_state, metrics)
  train_steps(train_state, batches) -> (train_state, metrics)  # K fused steps
where `TrainState` holds every piece of learner state (online and target
params, optimiser state, gradient-step counter, rng). The `DQNAgent` object is
a thin stateful wrapper: replay, epsilon schedule, when to train, and
Dopamine's `begin_episode` / `step` / `end_episode` for a single environment.
Its batched `select_actions` / `record` serve any number of environments with
the replay ratio of the single-env protocol (one update per `update_period`
agent steps, counted over all envs).

With `pipeline_updates` (off by default; uniform replay), the update due
`update_period` agent steps from now is started now: its batch is drawn ahead
(`ReplayBuffer.sample_ahead`: the same random numbers and arrays the draw at
its due step gives, or nothing when that draw would read a record still to be
written) and its gradient step dispatched, while actions for the steps in
between are chosen on a second host device (see `agents.devices`) with the
params of the updates already due. The results are kept only when the update
falls due at the predicted step; otherwise (a phase ends first, envs idle)
they are dropped and the replay's generator put back. Semantics are Dopamine's
exactly, and so are the numbers: a run gives the same metrics with and without
it; only the host and the learner overlap. It applies on CPU learners (on an
accelerator, acting would queue behind the started update or run on the host
from copied params, which is unmeasured). It pays only where the update leaves
a core idle: on 2 CPU cores, +7.5% agent steps/s for a lone dense DQN on Pong,
no change for Soft MoE, and 5-11% slower when two runs share the cores (a
sweep), so it is off unless asked for.

With `async_acting`, actions are chosen on the second host device with the
params the latest learner call started from, so action selection and
environment steps run while the update runs: every action is one gradient step
(one learner call) stale, by a fixed rule, so runs stay reproducible. Each
phase starts from the current params. Off by default: it changes the
protocol, and it is the overlap that prioritized replay can have (its next
draw depends on the running step's priorities, so it cannot be drawn ahead).

Update schedule: one gradient step per `update_period` agent steps once the
replay holds more than `min_replay_history` transitions, counted within each
training phase (`start_phase`), so seeds stepping in lockstep in a `SeedGroup`
update in the same rounds; Dopamine counts over the whole run, which differs
only by the at most `update_period - 1` steps of an iteration's tail.

Gin parameters keep Dopamine's names and defaults (`JaxDQNAgent.gamma` here is
`DQNAgent.gamma`; replay capacity and batch size live on the agent, which
builds the buffer). The MoE auxiliary loss of the network is added to the TD
loss. The target network is synced every
`target_update_period // update_period` gradient steps, which is Dopamine's
sync every `target_update_period` agent steps.
"""

import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agents import devices, losses
from agents.frame_stack import FrameStacker
from agents.metric_sums import MetricSums
from agents.replay import PrioritizedReplayBuffer, ReplayBuffer
from networks.checks import check_flags, check_fractions, is_int, is_number
from networks.expert_metrics import GRAM_KEY, expert_metrics, srank_from_gram
from networks.q_network import NetworkOutput, QNetwork


class TrainState(flax.struct.PyTreeNode):
  online_params: Any
  target_params: Any
  opt_state: Any
  step: jax.Array  # gradient steps taken
  rng: jax.Array

  @classmethod
  def create(cls, params, optimizer, rng) -> 'TrainState':
    """Step 0: the target a copy of `params` in its own buffers."""
    return cls(online_params=params,
               target_params=jax.tree_util.tree_map(jnp.copy, params),
               opt_state=optimizer.init(params),
               step=jnp.zeros((), jnp.int32), rng=rng)


@gin.configurable
def create_optimizer(name: str = 'adam', learning_rate: float = 6.25e-5,
                     beta1: float = 0.9, beta2: float = 0.999,
                     eps: float = 1.5e-4, centered: bool = False):
  """Dopamine's optimiser factory (same gin names)."""
  betas = (('beta1', beta1), ('beta2', beta2))
  for key, value in (('learning_rate', learning_rate), ('eps', eps), *betas):
    if not is_number(value) or not np.isfinite(value):
      raise ValueError(f'create_optimizer.{key}={value!r} must be a finite number.')
  if not learning_rate > 0 or not eps >= 0:
    raise ValueError(f'create_optimizer: learning_rate={learning_rate!r} must '
                     f'be > 0 and eps={eps!r} >= 0.')
  for key, value in betas:
    if not 0 <= value < 1:
      raise ValueError(f'create_optimizer.{key}={value!r} must be in [0, 1).')
  if name == 'adam':
    return optax.adam(learning_rate, b1=beta1, b2=beta2, eps=eps)
  if name == 'rmsprop':
    return optax.rmsprop(learning_rate, decay=beta2, eps=eps, centered=centered)
  if name == 'sgd':
    return optax.sgd(learning_rate)
  raise ValueError(f"create_optimizer.name='{name}' is unknown: use one of "
                   'adam, rmsprop, sgd.')


def linearly_decaying_epsilon(decay_period, step, warmup_steps, epsilon):
  """Dopamine's schedule: 1.0 during warm-up, then linear down to `epsilon`."""
  steps_left = decay_period + warmup_steps - step
  bonus = (1.0 - epsilon) * steps_left / decay_period
  return epsilon + float(np.clip(bonus, 0.0, 1.0 - epsilon))


def make_select_action(network: QNetwork, num_actions: int):
  """Epsilon-greedy over a batch; `deterministic` turns network noise off."""

  @functools.partial(jax.jit, static_argnames=('deterministic',))
  def select_action(params, observations, rng, epsilon, deterministic=False):
    rng_noise, rng_explore, rng_random = jax.random.split(rng, 3)
    q_values = network.apply({'params': params}, observations,
                             deterministic=deterministic,
                             rngs={'noise': rng_noise}).q_values  # [B, A]
    batch = q_values.shape[0]
    explore = jax.random.uniform(rng_explore, (batch,)) < epsilon
    random_actions = jax.random.randint(rng_random, (batch,), 0, num_actions)
    return jnp.where(explore, random_actions, jnp.argmax(q_values, axis=-1))

  return select_action


def dqn_td_loss(loss_fn: Callable, out_tm1: NetworkOutput,
                target_t: NetworkOutput, online_t: Optional[NetworkOutput],
                batch: Dict[str, jax.Array]) -> jax.Array:
  """Per-transition TD loss with a max (or double-DQN) bootstrap: [B]."""
  a_tm1 = batch['a_tm1']
  q_tm1 = jnp.take_along_axis(out_tm1.q_values, a_tm1[:, None], -1)[:, 0]  # [B]
  if online_t is None:
    q_t = jnp.max(target_t.q_values, axis=-1)  # [B]
  else:
    a_t = jnp.argmax(online_t.q_values, axis=-1)
    q_t = jnp.take_along_axis(target_t.q_values, a_t[:, None], -1)[:, 0]
  target = jax.lax.stop_gradient(batch['r_t'] + batch['discount_t'] * q_t)
  return loss_fn(target - q_tm1)


def make_train_step(network: QNetwork, optimizer, td_loss: Callable, *,
                    target_update_every: int, double_dqn: bool,
                    prioritized: bool,
                    diagnostics_fn: Optional[Callable] = None):
  """Builds the pure `train_step(state, batch) -> (state, metrics)`.

  `td_loss(out_tm1, target_t, online_t, batch) -> [B]` is the per-transition
  loss; with `prioritized`, transitions are weighted by importance weights
  1/sqrt(p) normalised by their max and the new priorities are
  sqrt(loss + 1e-10). `diagnostics_fn(out_tm1) -> dict` adds metrics computed
  from the same forward pass.
  """

  def loss_and_metrics(online_params, state: TrainState, batch, rng):
    rng_tm1, rng_target, rng_online = jax.random.split(rng, 3)
    apply = lambda params, obs, key: network.apply(
        {'params': params}, obs, deterministic=False, rngs={'noise': key})
    out_tm1 = apply(online_params, batch['obs_tm1'], rng_tm1)
    target_t = apply(state.target_params, batch['obs_t'], rng_target)
    online_t = None
    if double_dqn:
      online_t = jax.lax.stop_gradient(
          apply(online_params, batch['obs_t'], rng_online))
    per_sample = td_loss(out_tm1, target_t, online_t, batch)  # [B]
    metrics = {}
    if prioritized:
      weights = 1.0 / jnp.sqrt(batch['sampling_probabilities'] + 1e-10)
      weights = weights / jnp.max(weights)
      td = jnp.mean(weights * per_sample)
      metrics['priorities'] = jnp.sqrt(per_sample + 1e-10)
    else:
      td = jnp.mean(per_sample)
    total = td + out_tm1.aux_loss
    metrics.update(loss=total, td_loss=td, aux_loss=out_tm1.aux_loss,
                   q_mean=jnp.mean(out_tm1.q_values))
    if diagnostics_fn is not None:
      metrics.update(diagnostics_fn(out_tm1))
    return total, metrics

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    grads, metrics = jax.grad(loss_and_metrics, has_aux=True)(
        state.online_params, state, batch, step_rng)
    if diagnostics_fn is not None:
      metrics.update(router_gradient_norm(grads))
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.online_params)
    online = optax.apply_updates(state.online_params, updates)
    step = state.step + 1
    target = optax.periodic_update(online, state.target_params, step,
                                   target_update_every)
    return state.replace(online_params=online, target_params=target,
                         opt_state=opt_state, step=step, rng=rng), metrics

  return train_step


def router_gradient_norm(grads) -> Dict[str, jax.Array]:
  """Norm of the routing parameters' gradient (Soft MoE phi, router Dense)."""
  routing = grads.get('penultimate', {})
  leaves = [routing[k] for k in ('phi', 'router') if k in routing]
  if not leaves:
    return {}
  return {'moe/router_grad_norm': optax.tree.norm(leaves)}


def with_stack_axis_last(train_step):
  """Adapts a train step to replay stacks sampled frame-first, [B, S, *frame].

  The replay gathers stored frames in that layout without a strided host
  copy; the network takes [B, *frame, S], and the move happens on the device
  (fused into the input's conversion to float).
  """

  def step(state, batch):
    batch = dict(batch, obs_tm1=jnp.moveaxis(batch['obs_tm1'], 1, -1),
                 obs_t=jnp.moveaxis(batch['obs_t'], 1, -1))
    return train_step(state, batch)

  return step


def fuse_train_steps(train_step):
  """K gradient steps in one call: batches carry a leading [K] axis."""

  def train_steps(state, batches):
    # Unrolled: XLA:CPU runs a rolled scan of conv steps ~8x slower.
    return jax.lax.scan(train_step, state, batches, unroll=True)

  return train_steps


class _Lookahead(NamedTuple):
  """Gradient steps started before they fall due (`pipeline_updates`)."""
  due_at: Tuple[int, int]  # (replay add_count, number of steps) when due
  state: TrainState  # the learner state after them
  metrics: Dict[str, Any]
  rng_state: dict  # the replay generator's state before their draw


@gin.configurable
class DQNAgent:
  """Dopamine's JaxDQNAgent interface over the functional core."""

  def __init__(self,
               num_actions: int,
               observation_shape: tuple,
               observation_dtype=np.uint8,
               stack_size: int = 4,
               *,
               num_envs: int = 1,
               seed: int = 0,
               network=QNetwork,
               gamma: float = 0.99,
               update_horizon: int = 1,
               min_replay_history: int = 20000,
               update_period: int = 4,
               target_update_period: int = 8000,
               epsilon_train: float = 0.01,
               epsilon_eval: float = 0.001,
               epsilon_decay_period: int = 250000,
               loss_type: str = 'mse',
               replay_capacity: int = 1000000,
               batch_size: int = 32,
               replay_scheme: str = 'uniform',
               double_dqn: bool = False,
               log_expert_metrics: bool = True,
               async_acting: bool = False,
               pipeline_updates: bool = False):
    if loss_type not in losses.LOSSES:
      raise ValueError(f"DQNAgent.loss_type='{loss_type}' is unknown: use one "
                       f"of {', '.join(losses.LOSSES)}.")
    if replay_scheme not in ('uniform', 'prioritized'):
      raise ValueError(f"replay_scheme='{replay_scheme}' is unknown: use "
                       'uniform or prioritized.')
    for name, value in (('update_period', update_period),
                        ('target_update_period', target_update_period),
                        ('epsilon_decay_period', epsilon_decay_period),
                        ('update_horizon', update_horizon),
                        ('num_envs', num_envs)):
      if not is_int(value) or value < 1:
        raise ValueError(f'{type(self).__name__}.{name}={value!r} must be an '
                         'integer >= 1.')
    check_flags(type(self).__name__, double_dqn=double_dqn,
                log_expert_metrics=log_expert_metrics, async_acting=async_acting,
                pipeline_updates=pipeline_updates)
    check_fractions(type(self).__name__, gamma=gamma, epsilon_train=epsilon_train,
                    epsilon_eval=epsilon_eval)
    # The first update samples once add_count * num_envs > min_replay_history,
    # and a record needs the update_horizon records after it stored.
    if not is_int(min_replay_history) or (min_replay_history <
                                          update_horizon * num_envs):
      raise ValueError(
          f'{type(self).__name__}.min_replay_history={min_replay_history!r} '
          f'must be an integer >= update_horizon x num_envs '
          f'({update_horizon} x {num_envs}), so that the first update finds '
          'a complete transition.')
    self.num_actions = num_actions
    self.observation_shape = tuple(observation_shape)
    self.stack_size = stack_size
    self.num_envs = num_envs
    self.gamma = gamma
    self.update_horizon = update_horizon
    self.min_replay_history = min_replay_history
    self.update_period = update_period
    self.target_update_period = target_update_period
    self.epsilon_train = epsilon_train
    self.epsilon_eval = epsilon_eval
    self.epsilon_decay_period = epsilon_decay_period
    self.batch_size = batch_size
    self.network = network(num_actions=num_actions, **self._network_kwargs())
    self.eval_mode = False

    replay_cls = (PrioritizedReplayBuffer if replay_scheme == 'prioritized'
                  else ReplayBuffer)
    # Stacked frames are sampled frame-first (cheaper) and moved on the device.
    self.replay = replay_cls(
        observation_shape=self.observation_shape, stack_size=stack_size,
        replay_capacity=replay_capacity, batch_size=batch_size,
        update_horizon=update_horizon, gamma=gamma, num_envs=num_envs,
        observation_dtype=observation_dtype, seed=seed, stack_axis_first=True)
    self._prioritized = replay_scheme == 'prioritized'

    self.async_acting = async_acting
    # Drawing ahead needs uniform replay; async acting overlaps in its own way.
    # On an accelerator, acting would queue behind the started update there,
    # or run on the host from copied params: unmeasured, so the pipeline is off.
    self.pipeline_updates = (pipeline_updates and not async_acting
                             and not self._prioritized
                             and devices.learner_device().platform == 'cpu')
    # Acting runs on its own device whenever it may overlap a learner call.
    self._acting_device = (devices.acting_device() if self.overlaps_learner
                           else None)
    rng = jax.random.PRNGKey(seed)
    rng, init_rng, state_rng = jax.random.split(rng, 3)
    self._rng = self._on_acting_device(rng)
    self._stacker = FrameStacker(1, self.observation_shape, stack_size,
                                 observation_dtype)
    dummy = jnp.zeros((1, *self._stacker.observations.shape[1:]),
                      observation_dtype)
    params = self.network.init({'params': init_rng, 'noise': init_rng},
                               dummy)['params']
    self.optimizer = create_optimizer()
    self.state = TrainState.create(params, self.optimizer, state_rng)

    self._select_action = make_select_action(self.network, num_actions)

    def act(params, observations, rng, epsilon, deterministic):
      rng, key = jax.random.split(rng)  # the same key stream as a Python split
      return self._select_action(params, observations, key, epsilon,
                                 deterministic=deterministic), rng

    # One dispatch per action: rng split and selection in one jitted call.
    self._act = jax.jit(act, static_argnames=('deterministic',))
    train_step = make_train_step(
        self.network, self.optimizer,
        functools.partial(self._td_loss, losses.LOSSES[loss_type]),
        target_update_every=max(1, target_update_period // update_period),
        double_dqn=double_dqn, prioritized=self._prioritized,
        diagnostics_fn=expert_metrics if log_expert_metrics else None)
    if self.replay.stacked:
      train_step = with_stack_axis_last(train_step)
    self.train_step_fn = train_step  # pure, for vmapping across seeds
    self.train_step = self._jit_learner_call(train_step)
    self.train_steps = self._jit_learner_call(fuse_train_steps(train_step))
    self._acting_params = None  # on the acting device: the params acting uses
    self._lookahead = None  # the next due update, started early (pipeline)
    self.training_steps = 0  # agent steps seen while training (all envs)
    self._update_credit = 0.0
    self.pending_updates = 0  # gradient steps due but not yet run
    self.defer_updates = False  # a SeedGroup runs the updates of many agents
    self.metric_sums = MetricSums()  # train-step metrics since pop_metrics
    self._pending_priorities = None  # (indices, priorities) of the last step

  # -- Hooks for variants (Rainbow overrides these two). --------------------
  def _network_kwargs(self) -> Dict[str, Any]:
    return {}

  def _td_loss(self, loss_fn, out_tm1, target_t, online_t, batch):
    return dqn_td_loss(loss_fn, out_tm1, target_t, online_t, batch)

  # -- Acting params (async_acting, pipeline_updates). --------------------------
  @property
  def overlaps_learner(self) -> bool:
    """Whether acting may run while a learner call runs (async acting, or
    the pipeline), so acting uses its own device and the learner never waits."""
    return self.async_acting or self.pipeline_updates

  def _jit_learner_call(self, step):
    """Jits `step(state, batch)`, donating the learner state to it, except
    when acting overlaps the learner: acting then reads params a learner call
    started from, in place (`_on_acting_device`), so no call may overwrite
    them, and the pipeline may drop a call's results and keep its input.
    (Donating all but the online params measured 15% slower on Rainbow's
    update than donating nothing.)"""
    if self.overlaps_learner:
      return jax.jit(step)
    return jax.jit(step, donate_argnums=0)

  def _on_acting_device(self, tree):
    """`tree` on the acting device; `tree` itself when acting does not
    overlap the learner.

    Goes through host views of the buffers (waiting until they are ready):
    on CPU the acting arrays then alias the learner's, with no copy. A
    device-to-device copy would instead queue behind the learner's next
    call (XLA:CPU runs a device's work in order) and stretch it. Aliasing is
    safe because learner calls never donate the online params (above).
    """
    if self._acting_device is None:
      return tree
    host = jax.tree_util.tree_map(np.asarray, tree)
    return jax.device_put(host, self._acting_device)

  def _refresh_acting_params(self) -> None:
    if self._acting_device is not None:
      self._acting_params = self._on_acting_device(self.state.online_params)

  def start_phase(self, eval_mode: bool) -> None:
    """Called by the runner at the start of a training or evaluation phase:
    acting starts from the current params, the update schedule from zero."""
    self.eval_mode = eval_mode
    self.drop_lookahead()  # its prediction assumed the schedule went on
    self._refresh_acting_params()
    if not eval_mode:
      self._update_credit = 0.0

  # -- Batched interface used by the runner. --------------------------------
  def epsilon(self) -> float:
    if self.eval_mode:
      return self.epsilon_eval
    return linearly_decaying_epsilon(self.epsilon_decay_period,
                                     self.training_steps,
                                     self.min_replay_history,
                                     self.epsilon_train)

  def select_actions(self, observations: np.ndarray) -> np.ndarray:
    """observations [N, ...] stacked states -> actions [N] (epsilon-greedy)."""
    if self._acting_device is None:
      params = self.state.online_params
    else:
      if self._acting_params is None:
        self._refresh_acting_params()
      params = self._acting_params
    actions, self._rng = self._act(params, observations, self._rng,
                                   self.epsilon(), deterministic=self.eval_mode)
    return np.asarray(actions)

  def record(self, observations, actions, rewards, terminals, episode_ends,
             active=None) -> None:
    """Stores one step of every env and trains when due.

    `observations` are the stacked states the actions were taken in
    ([N, ..., stack]); only their newest frame is stored. `rewards` are what
    the agent learns from (the runner clips them). Envs with `active` False
    (idle at the end of a phase) store an empty one-step episode that is never
    sampled, and do not count as agent steps.
    """
    observations = np.asarray(observations)
    stacked = observations.ndim > 1 + len(self.observation_shape)
    frames = observations[..., -1] if stacked else observations  # [N, *shape]
    ends = np.asarray(episode_ends, bool)
    if active is not None and not np.all(active):
      idle = ~np.asarray(active, bool)
      frames = np.where(idle.reshape((-1,) + (1,) * (frames.ndim - 1)), 0,
                        frames)
      actions = np.where(idle, 0, actions)
      rewards = np.where(idle, 0.0, rewards)
      terminals = np.where(idle, False, terminals)
      ends = ends | idle
      num_steps = int(np.sum(~idle))
    else:
      num_steps = len(ends)
    self.write_priorities()  # a new record takes the tree's max priority
    self.replay.add(frames, actions, rewards, terminals, ends)
    self.training_steps += num_steps
    self._update_credit += num_steps / self.update_period
    due = int(self._update_credit)
    self._update_credit -= due
    if self.replay.add_count * self.num_envs > self.min_replay_history:
      self.pending_updates += due
    if not self.defer_updates:
      self.run_pending_updates()

  def run_pending_updates(self) -> None:
    """Runs the gradient steps that are due.

    With uniform replay, K > 1 due steps (several envs) run fused in one
    jitted scan over K pre-sampled batches, numerically the same as K
    sequential steps. Prioritized replay runs them one by one, since each
    step's new priorities shape the next sample. With the pipeline, steps
    started early for this record are kept, and the next due ones started.
    """
    k, self.pending_updates = self.pending_updates, 0
    if not k:
      return
    acting_params = self.state.online_params  # what these steps start from
    lookahead = self._lookahead
    if lookahead is not None and lookahead.due_at == (self.replay.add_count, k):
      self._lookahead = None
      self.state = lookahead.state
      self._accumulate(lookahead.metrics, k)
    else:
      self.drop_lookahead()  # predicted for another record: as if never run
      if self._prioritized:
        for _ in range(k):
          self.train_once()
      else:
        batches = [self.replay.sample() for _ in range(k)]
        self.state, metrics = self._dispatch_uniform(self.state, batches)
        self._accumulate(metrics, k)
    if self.pipeline_updates and not self.defer_updates:
      self._start_next_due()
    if self._acting_device is not None:
      # Taken once the next steps are queued, so the learner never idles while
      # the host waits here for params; acting then goes on while they run.
      # Async acting takes the params these steps started from, the pipeline
      # (exact) the params they produce.
      self._acting_params = self._on_acting_device(
          acting_params if self.async_acting else self.state.online_params)

  def _dispatch_uniform(self, state, batches):
    """Dispatches one gradient step per batch (fused when several) from
    `state`: (new state, metrics as `_accumulate` takes them)."""
    for batch in batches:
      batch.pop('indices')
    if len(batches) == 1:
      return self.train_step(state, batches[0])
    stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
    state, metrics = self.train_steps(state, stacked)
    return state, {key: value[-1] if key == GRAM_KEY else value.mean(0)
                   for key, value in metrics.items()}

  def _next_due(self):
    """(records from now, gradient steps) of the next record at which
    updates fall due if every env stays active; None before the replay holds
    `min_replay_history`. Replays `record`'s own float arithmetic."""
    credit, records, due = self._update_credit, 0, 0
    # Float sums can fall just short (ten 0.1s make 0.9999999999999999), so
    # a step may come one record later than update_period / num_envs says.
    while not due and records <= 2 * self.update_period:
      records += 1
      credit += self.num_envs / self.update_period
      due = int(credit)
    if not due:
      return None
    if (self.replay.add_count + records) * self.num_envs <= self.min_replay_history:
      return None
    return records, due

  def _start_next_due(self) -> None:
    """Draws the batches of the next due update ahead and dispatches its
    steps from the current state, if the draw is possible now."""
    next_due = self._next_due()
    if next_due is None:
      return
    records, k = next_due
    rng_state = self.replay.rng_state
    batches = self.replay.sample_ahead(records, k)
    if batches is None:
      return
    state, metrics = self._dispatch_uniform(self.state, batches)
    self._lookahead = _Lookahead(due_at=(self.replay.add_count + records, k),
                                 state=state, metrics=metrics,
                                 rng_state=rng_state)

  def drop_lookahead(self) -> None:
    """Drops the update started early, putting the replay's generator back
    (before anything else samples, or a checkpoint saves it)."""
    if self._lookahead is not None:
      self.replay.rng_state = self._lookahead.rng_state
      self._lookahead = None

  def train_once(self) -> None:
    """One gradient step on a fresh sample (the prioritized path)."""
    self.write_priorities()
    batch = self.replay.sample()
    indices = batch.pop('indices')
    self.state, metrics = self.train_step(self.state, batch)
    if self._prioritized:
      self._pending_priorities = (indices, metrics['priorities'])
    self._accumulate(metrics)

  def write_priorities(self) -> None:
    """Writes the last gradient step's new priorities into the sum tree.

    A step's priorities are written just before the tree is next read or
    written (the next replay record, which takes the tree's max priority and
    may overwrite a sampled slot; the next sample; a checkpoint), not when
    the step is dispatched. Every read thus sees what Dopamine's immediate
    write gives, and the host need not wait for the step in between (with
    async acting, the next action and env step overlap it).
    """
    if self._pending_priorities is not None:
      indices, priorities = self._pending_priorities
      self._pending_priorities = None
      self.replay.update_priorities(indices, np.asarray(priorities))

  def _accumulate(self, metrics, count: int = 1) -> None:
    """Adds `count` steps' worth of metrics (`metrics` holds their mean)."""
    metrics = dict(metrics)
    metrics.pop('priorities', None)
    gram = metrics.pop(GRAM_KEY, None)  # the last step's Gram matrix, not a sum
    self.metric_sums.add(metrics, count, latest=gram)

  def pop_metrics(self) -> Dict[str, float]:
    """Means of the train-step metrics since the last call ({} if none).

    Per-expert vectors become one key per expert (`moe/expert_share_3`).
    """
    result = self.metric_sums.pop()
    if result is None:
      return {}
    sums, count, gram = result
    means = {}
    for key, value in sums.items():
      value = np.asarray(value) / count
      if value.ndim == 0:
        means[key] = float(value)
      else:  # per-expert vectors -> one scalar per expert
        means.update({f'{key}_{i}': float(v) for i, v in enumerate(value)})
    if gram is not None:
      means['moe/srank'] = srank_from_gram(gram)
    return means

  # -- Dopamine's single-environment interface. -----------------------------
  def begin_episode(self, observation: np.ndarray) -> int:
    self._stacker.reset(observation[None])
    self._action = int(self.select_actions(self._stacker.observations)[0])
    return self._action

  def step(self, reward: float, observation: np.ndarray) -> int:
    if not self.eval_mode:
      self.record(self._stacker.observations, [self._action], [reward],
                  [False], [False])
    self._stacker.push(observation[None], np.zeros(1, bool))
    self._action = int(self.select_actions(self._stacker.observations)[0])
    return self._action

  def end_episode(self, reward: float, terminal: bool = True) -> None:
    if not self.eval_mode:
      self.record(self._stacker.observations, [self._action], [reward],
                  [terminal], [True])

  # -- Checkpointing. --------------------------------------------------------
  def checkpoint_state(self) -> Dict[str, Any]:
    self.write_priorities()  # the saved replay holds every step's priorities
    self.drop_lookahead()  # the saved generator is the one sample() goes on from
    return {'train_state': self.state, 'rng': self._rng}

  def checkpoint_values(self) -> Dict[str, Any]:
    return {'training_steps': self.training_steps,
            'update_credit': self._update_credit}

  def restore(self, state: Dict[str, Any], values: Dict[str, Any]) -> None:
    self.state = state['train_state']
    self._rng = self._on_acting_device(state['rng'])
    self.training_steps = int(values['training_steps'])
    self._update_credit = float(values['update_credit'])
    self._acting_params = None
    # A lookahead belonged to the replaced state. Its draw is not put back: the
    # caller restores the replay too (the Runner builds its restore template
    # with checkpoint_state, which drops the lookahead before the replay loads).
    self._lookahead = None
    self._pending_priorities = None  # they belonged to the replaced state
