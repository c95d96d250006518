"""The experiment runner: iterations of a training phase and an optional
evaluation phase, with logging, checkpoints and automatic resume.

Protocol (Dopamine's Runner): each iteration runs `training_steps` agent steps
of training; an episode still going when the budget is reached finishes past
it, and no new episode starts (with several envs, an env whose episode ends
after the budget idles until the others finish). Episodes therefore never
span iterations, so a checkpoint at the end of an iteration captures
everything and a resumed run starts the next iteration with fresh episodes.
Rewards are clipped to [-1, 1] for learning only (`clip_rewards`); returns are
reported unclipped. `schedule='continuous_train_and_eval'` adds an evaluation
phase of `evaluation_steps` with the agent's `epsilon_eval` and no network
noise.

Step accounting in metrics.jsonl: `agent_steps` and `frames` follow the
protocol's budget, (iteration + 1) * training_steps (x 4 frames per step on
Atari), the x-axis of Dopamine's published curves; `agent_steps_taken` counts
the training steps actually taken, episode overruns included.
"""

import contextlib
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import gin
import numpy as np

from agents.dqn_agent import DQNAgent
from agents.frame_stack import FrameStacker
from agents.rainbow_agent import RainbowAgent
from experiments import environments
from experiments.checkpoints import Checkpointer
from experiments.logger import MetricsLogger, read_metrics, truncate_metrics
from experiments.run_dir import RunDir, RunDirError, Terminated
from networks.checks import MAX_SEED, check_flags, is_int
from networks.q_network import count_parameters

gin.external_configurable(environments.create_atari_environment,
                          'create_atari_environment')
gin.external_configurable(environments.create_gym_environment,
                          'create_gym_environment')

SCHEDULES = ('continuous_train', 'continuous_train_and_eval')
AGENT_NAMES = {DQNAgent: 'dqn', RainbowAgent: 'rainbow'}


def _phase_seed(seed: int, iteration: int, phase: int) -> int:
  # 31 bits: ALE's reset takes a signed 32-bit seed (2**31 and up is refused).
  state = np.random.SeedSequence([seed, iteration, phase]).generate_state(1)[0]
  return int(state) & 0x7FFFFFFF


class Progress:
  """A progress bar (steps/s, recent return) on a terminal. On other streams
  (sweep logs, batch jobs), one plain line every `LINE_SECONDS`, besides the
  runner's line per iteration."""

  LINE_SECONDS = 60.0

  def __init__(self, total: int, description: str, stream=sys.stderr):
    self._bar = None
    if stream.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, desc=description, unit='step',
                       dynamic_ncols=True, leave=False, file=stream,
                       mininterval=0.5)
    self._pending = 0
    self._total, self._description, self._stream = total, description, stream
    self._done, self._recent = 0, None
    self._start = time.monotonic()
    self._next_line = self._start + self.LINE_SECONDS

  def update(self, steps: int, recent_return: Optional[float]) -> None:
    if self._bar is None:
      self._plain_update(steps, recent_return)
      return
    self._pending += steps
    if self._pending >= 200:
      self._bar.update(self._pending)
      self._pending = 0
      if recent_return is not None:
        self._bar.set_postfix(ret=f'{recent_return:.1f}', refresh=False)

  def _plain_update(self, steps: int, recent_return: Optional[float]) -> None:
    self._done += steps
    if recent_return is not None:
      self._recent = recent_return
    now = time.monotonic()
    if now < self._next_line:
      return
    self._next_line = now + self.LINE_SECONDS
    recent = '' if self._recent is None else f', recent return {self._recent:.1f}'
    print(f'{self._description}: {self._done}/{self._total} agent steps, '
          f'{self._done / (now - self._start):.0f} steps/s{recent}',
          file=self._stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class Phase:
  """One phase (training or evaluation) of one agent on one batched env.

  Runs until `min_steps` agent steps have been taken and every env's episode
  has ended (an env whose episode ends past the budget idles). `step` takes
  the actions for the current observations; the runner (or a SeedGroup)
  chooses them.
  """

  def __init__(self, runner: 'Runner', env, min_steps: int, eval_mode: bool,
               iteration: int):
    self.runner, self.env, self.min_steps = runner, env, min_steps
    self.eval_mode = eval_mode
    self.agent = runner.agent
    self.agent.start_phase(eval_mode)
    n = env.num_envs
    self.stacker = FrameStacker(n, env.observation_shape, self.agent.stack_size,
                                env.observation_dtype)
    self.stacker.reset(env.reset(seed=_phase_seed(runner.seed, iteration,
                                                  eval_mode)))
    self.active = np.ones(n, bool)
    self.running_return = np.zeros(n)
    self.returns: List[float] = []
    self.steps = 0
    self.start = time.time()

  @property
  def done(self) -> bool:
    return not self.active.any()

  @property
  def observations(self) -> np.ndarray:
    return self.stacker.observations

  @property
  def recent_return(self) -> Optional[float]:
    return self.returns[-1] if self.returns else None

  def step(self, actions: np.ndarray) -> int:
    """Steps every env; returns the number of agent steps that counted."""
    observations = self.stacker.observations
    result = self.env.step(actions)
    ends = result.episode_ends  # games over or capped: returns complete
    active = self.active
    if not self.eval_mode:
      rewards = (np.clip(result.reward, -1.0, 1.0) if self.runner.clip_rewards
                 else result.reward)
      self.agent.record(observations, actions, rewards, result.terminal,
                        result.agent_episode_ends, active)
    self.running_return += np.where(active, result.reward, 0.0)
    num_active = int(active.sum())
    self.steps += num_active
    for i in np.flatnonzero(ends & active):
      self.returns.append(float(self.running_return[i]))
    self.running_return[ends] = 0.0
    if self.steps >= self.min_steps:
      self.active = active & ~ends
    self.stacker.push(result.observation, result.agent_episode_ends)
    return num_active

  def close(self) -> None:
    self.agent.eval_mode = False
    self.seconds = time.time() - self.start

  def stats(self) -> Dict[str, Any]:
    return {'steps': self.steps, 'seconds': self.seconds,
            'episodes': len(self.returns),
            'return_mean': (float(np.mean(self.returns)) if self.returns
                            else None)}


@gin.configurable
class Runner:
  """Builds the environment and the agent from gin and runs the experiment."""

  def __init__(self,
               base_dir: Optional[str],
               *,
               create_environment_fn: Callable = environments.create_atari_environment,
               agent: Callable = DQNAgent,
               num_iterations: int = 200,
               training_steps: int = 250000,
               evaluation_steps: int = 125000,
               max_steps_per_episode: int = 27000,
               schedule: str = 'continuous_train',
               clip_rewards: bool = True,
               num_envs: int = 1,
               seed: int = 0,
               checkpoint_replay: bool = True,
               variant: Optional[str] = None,
               num_actions: Optional[int] = None,
               log_stream=None):
    if schedule not in SCHEDULES:
      raise ValueError(f"Runner.schedule='{schedule}' is unknown: use one of "
                       f"{', '.join(SCHEDULES)}.")
    for name, value in (('num_iterations', num_iterations),
                        ('training_steps', training_steps),
                        ('evaluation_steps', evaluation_steps),
                        ('num_envs', num_envs)):
      if not is_int(value) or value < 1:
        raise ValueError(f'Runner.{name}={value!r} must be an integer >= 1.')
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
      raise ValueError(f'Runner.seed={seed!r} must be an integer in [0, '
                       f'{MAX_SEED}].')
    check_flags('Runner', clip_rewards=clip_rewards,
                checkpoint_replay=checkpoint_replay)
    self.base_dir = base_dir
    self.num_iterations = num_iterations
    self.training_steps = training_steps
    self.evaluation_steps = evaluation_steps
    self.schedule = schedule
    self.clip_rewards = clip_rewards
    self.num_envs = num_envs
    self.seed = seed
    self.label = ''  # prefix of the lines the run prints (a group names seeds)
    self.checkpoint_replay = checkpoint_replay
    self._log_stream = log_stream or sys.stderr
    self._make_env = lambda n: create_environment_fn(
        num_envs=n, seed=seed, max_steps_per_episode=max_steps_per_episode)
    self.env = self._make_env(num_envs)
    self._eval_env = None
    self._run_dir = None  # RunDir, once lock_run_dir (or open_run) holds base_dir
    self.is_atari = isinstance(self.env, environments.AtariEnv)
    self.agent = agent(
        num_actions if num_actions is not None else self.env.num_actions,
        self.env.observation_shape, self.env.observation_dtype,
        num_envs=num_envs, seed=seed)  # stack_size: a gin parameter of the agent
    self.num_params = count_parameters(self.agent.state.online_params)
    self.identity = dict(
        game=self.env.name, is_atari=self.is_atari, seed=seed,
        agent=AGENT_NAMES.get(type(self.agent), type(self.agent).__name__),
        num_params=self.num_params, variant=variant,
        **self.agent.network.describe())
    self._frames_per_step = self.env.frame_skip

  # -- Phases. -----------------------------------------------------------------
  def new_phase(self, env, min_steps: int, eval_mode: bool,
                iteration: int) -> 'Phase':
    return Phase(self, env, min_steps, eval_mode, iteration)

  def _run_phase(self, env, min_steps: int, eval_mode: bool, iteration: int,
                 description: str) -> Dict[str, Any]:
    phase = self.new_phase(env, min_steps, eval_mode, iteration)
    progress = Progress(min_steps, description, self._log_stream)
    try:
      while not phase.done:
        num_active = phase.step(self.agent.select_actions(phase.observations))
        progress.update(num_active, phase.recent_return)
    finally:
      progress.close()
      phase.close()
    return phase.stats()

  def eval_env(self):
    if self._eval_env is None:
      self._eval_env = self._make_env(self.num_envs)
    return self._eval_env

  def run_iteration(self, iteration: int) -> Dict[str, Any]:
    train = self._run_phase(self.env, self.training_steps, False, iteration,
                            f'iter {iteration} train')
    evaluation = None
    if self.schedule == 'continuous_train_and_eval':
      evaluation = self._run_phase(self.eval_env(), self.evaluation_steps, True,
                                   iteration, f'iter {iteration} eval')
    return self.iteration_metrics(iteration, train, evaluation)

  def iteration_metrics(self, iteration: int, train: Dict[str, Any],
                        evaluation: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The metrics.jsonl record of one iteration (pops the agent's metrics)."""
    metrics = dict(self.identity)
    agent_steps = (iteration + 1) * self.training_steps
    metrics.update(
        iteration=iteration,
        agent_steps=agent_steps,
        frames=agent_steps * self._frames_per_step,
        agent_steps_taken=self.agent.training_steps,
        train_episode_return_mean=train['return_mean'],
        train_episodes=train['episodes'],
        agent_steps_per_second=train['steps'] / max(train['seconds'], 1e-9),
        train_seconds=train['seconds'],
        eval_episode_return_mean=None,
        eval_episodes=0,
        loss=None, td_loss=None, aux_loss=None, q_mean=None)  # before any update
    metrics.update(self.agent.pop_metrics())
    if evaluation is not None:
      metrics.update(eval_episode_return_mean=evaluation['return_mean'],
                     eval_episodes=evaluation['episodes'])
    return metrics

  # -- Checkpoints and the experiment. ------------------------------------------
  def _checkpoint_state(self, with_replay: bool) -> Dict[str, Any]:
    state = {'agent': self.agent.checkpoint_state(),
             'counters': self.agent.checkpoint_values()}
    if with_replay and self.checkpoint_replay:
      state['replay'] = self.agent.replay
    return state

  def open_run(self, operative_config: str, restore: bool = True) -> int:
    """Prepares the run directory and restores the newest checkpoint.

    Returns the next iteration to run (the newest checkpoint's + 1, or 0).
    With `restore=False` the agent is left as built, for a caller that picks
    the checkpoint itself (a SeedGroup resumes its seeds from a common one).
    Bad input (a base_dir another process trains in, a foreign or
    different-config base_dir, a corrupt checkpoint, logged iterations whose
    checkpoints are gone, a damaged metrics.jsonl line) raises RunDirError
    before anything on disk changes: a resumed run's config.gin (which may
    differ in Runner.num_iterations) is rewritten by `start_logging`.
    """
    self.lock_run_dir()  # released by end_run or close, or below on refusal
    try:
      return self._open_locked_run(operative_config, restore)
    except BaseException:
      self._run_dir.unlock()
      raise

  def lock_run_dir(self) -> None:
    """Holds base_dir (created if missing) for this process; RunDirError while
    another process trains in it. A SeedGroup takes every seed's first."""
    if self._run_dir is None:
      self._run_dir = RunDir(self.base_dir)
    self._run_dir.lock()

  def _open_locked_run(self, operative_config: str, restore: bool) -> int:
    resume = self._run_dir.prepare(operative_config)
    self._operative_config = operative_config
    self._checkpointer = Checkpointer(self._run_dir.checkpoint_dir)
    latest = self._checkpointer.latest_iteration() if resume else None
    start = 0 if latest is None else latest + 1
    if start > self.num_iterations:
      raise RunDirError(
          f'--base_dir {self.base_dir} holds {start} finished iterations, more '
          f'than Runner.num_iterations = {self.num_iterations}; pass {start} or '
          'more to extend the run, or use a new --base_dir.')
    # A run killed between logging an iteration and checkpointing it has one
    # logged iteration past its checkpoint, which the resume drops; more means
    # checkpoints were removed, and resuming would drop logged results.
    # Read strictly: a damaged line is refused here, before any write (the
    # resume's truncate_metrics would refuse it only after config.gin). A run
    # stopped before its first iteration was logged has no metrics.jsonl yet.
    records = []
    if resume and os.path.exists(self._run_dir.metrics_path):
      records = read_metrics(self._run_dir.metrics_path)
    logged = max((r['iteration'] for r in records if is_int(r.get('iteration'))),
                 default=-1)
    if logged > start:
      newest = 'none' if latest is None else f'iteration {latest}'
      raise RunDirError(
          f'{self._run_dir.metrics_path} logs iterations up to {logged}, but '
          f'the newest checkpoint is {newest}: resuming would drop the logged '
          'iterations after it. Put the checkpoints back, or use a new '
          '--base_dir.')
    if restore and latest is not None:
      self.restore_checkpoint(latest)
    return start

  def latest_checkpoint(self) -> Optional[int]:
    return self._checkpointer.latest_iteration()

  def restore_checkpoint(self, iteration: int) -> None:
    restored = self._checkpointer.restore(
        iteration, template=self._checkpoint_state(with_replay=True))
    self.agent.restore(restored['agent'], restored['counters'])

  def start_logging(self, iteration: int) -> None:
    """Writes config.gin, drops logged iterations past the checkpoint, then
    opens the logger: the first writes of a run that `open_run` accepted."""
    self._run_dir.write_config(self._operative_config)
    truncate_metrics(self._run_dir.metrics_path, iteration - 1)
    self._logger = MetricsLogger(self.base_dir, purge_step=iteration)
    self._run_dir.write_status('running', iteration)

  def finish_iteration(self, metrics: Dict[str, Any]) -> None:
    """Logs an iteration, checkpoints it, and updates status.json."""
    self._logger.write(metrics)
    self._checkpointer.save(metrics['iteration'],
                            self._checkpoint_state(with_replay=True))
    self._run_dir.write_status('running', metrics['iteration'] + 1)
    print(self.label + _summary_line(metrics), file=self._log_stream,
          flush=True)

  def end_run(self, iteration: int, error: Optional[BaseException]) -> None:
    if error is None:
      self._run_dir.write_status('done', iteration)
    else:
      if isinstance(error, Terminated):
        message = 'terminated (SIGTERM)'
      elif isinstance(error, KeyboardInterrupt):
        message = 'interrupted'
      else:
        message = f'{type(error).__name__}: {error}'
      self._run_dir.write_status('failed', iteration, message)
    self._logger.close()
    self._run_dir.unlock()

  def run_experiment(self, operative_config: str) -> None:
    """Runs (or resumes) every iteration."""
    iteration = self.open_run(operative_config)
    if iteration == self.num_iterations:
      self._run_dir.write_config(self._operative_config)
      self._run_dir.write_status('done', iteration)
      self._run_dir.unlock()
      print(f'{self.base_dir}: all {iteration} iterations are done; nothing to '
            'train (a larger Runner.num_iterations extends the run).',
            file=self._log_stream, flush=True)
      return
    print(self.label + start_line(self.base_dir, iteration, self.num_iterations,
                                   self.training_steps),
          file=self._log_stream, flush=True)
    self.start_logging(iteration)
    try:
      while iteration < self.num_iterations:
        self.finish_iteration(self.run_iteration(iteration))
        iteration += 1
    except BaseException as e:
      self.end_run(iteration, e)
      raise
    self.end_run(iteration, None)

  def restore_agent(self) -> int:
    """Loads the newest checkpoint's agent (not the replay); returns its iteration."""
    run_dir = RunDir(self.base_dir)
    run_dir.check_layout()
    checkpointer = Checkpointer(run_dir.checkpoint_dir)
    latest = checkpointer.latest_iteration()
    if latest is None:
      raise RunDirError(f'{self.base_dir} holds no checkpoint; train first '
                        'with `moerl train --base_dir ...`.')
    restored = checkpointer.restore(
        latest, template=self._checkpoint_state(with_replay=False))
    self.agent.restore(restored['agent'], restored['counters'])
    return latest

  def eval_steps(self, seed: int, policy: Optional[Callable] = None
                 ) -> Iterator[Tuple[np.ndarray, environments.StepResult]]:
    """Steps a fresh single env, yielding (observations, result) per step:
    the stacked observations [1, ...] the action was chosen on, and the step.

    `policy(observations) -> actions [1]` defaults to the agent in evaluation
    mode (epsilon_eval, no network noise). Closing the generator closes the
    env and ends evaluation mode.
    """
    env = self._make_env(1)
    agent = self.agent
    agent.start_phase(eval_mode=True)
    policy = policy or agent.select_actions
    stacker = FrameStacker(1, env.observation_shape, agent.stack_size,
                           env.observation_dtype)
    stacker.reset(env.reset(seed=seed))
    try:
      while True:
        observations = stacker.observations
        result = env.step(policy(observations))
        yield observations, result
        stacker.push(result.observation, result.agent_episode_ends)
    finally:
      agent.eval_mode = False
      env.close()

  def evaluate_episodes(self, num_episodes: int, seed: int = 12345,
                        policy: Optional[Callable] = None) -> List[float]:
    """Returns of `num_episodes` whole games (see `eval_steps`)."""
    returns, running = [], 0.0
    if num_episodes < 1:
      return returns
    with contextlib.closing(self.eval_steps(seed, policy)) as steps:
      for _, result in steps:
        running += float(result.reward[0])
        if result.episode_ends[0]:
          returns.append(running)
          running = 0.0
          if len(returns) == num_episodes:
            break
    return returns

  def close(self) -> None:
    self.env.close()
    if self._eval_env is not None:
      self._eval_env.close()
    if self._run_dir is not None:
      self._run_dir.unlock()


def _format(value, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def start_line(base_dir: str, iteration: int, num_iterations: int,
                training_steps: int) -> str:
  if iteration:
    return (f'{base_dir}: resuming at iteration {iteration} of {num_iterations} '
            f'({training_steps} agent steps each)')
  return (f'{base_dir}: starting, {num_iterations} iterations of '
          f'{training_steps} agent steps')


def _summary_line(m: Dict[str, Any]) -> str:
  return (f"iteration {m['iteration']}: agent_steps={m['agent_steps']} "
          f"train_return={_format(m['train_episode_return_mean'], '.2f')} "
          f"({m['train_episodes']} episodes) "
          f"eval_return={_format(m['eval_episode_return_mean'], '.2f')} "
          f"loss={_format(m['loss'], '.4f')} "
          f"steps/s={m['agent_steps_per_second']:.0f}")
