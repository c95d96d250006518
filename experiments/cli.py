"""`moerl`: the command line. Thin: every command calls an importable function.

  moerl train  --base_dir D --gin_files F [--gin_files F2] [--gin_bindings B]... [--num_seeds S]
  moerl eval   --base_dir D [--episodes N]
  moerl params --gin_files F [--gin_bindings B]... [--num_actions 18] [--json]
  moerl sweep  SPEC --out DIR [--workers N] [--backend local|ray] [--dry_run]
               [--seeds_per_process] [--ray_address A] [--cpus_per_run C]
               [--gpus_per_run G]
  moerl plot   DIR [--out OUT] [--last_n N] [--metric train|eval]
  moerl bench  [--networks] [--agent] [--envs] [--throughput] [--quick] [--json]
  moerl experts --base_dir D [--keep K,...] [--states N] [--episodes N] [--seed S]
  moerl representation [--out DIR] [--steps N] [--seed S] [--experts 1,8]

Exit codes: 0 success, 1 a run failed, 2 bad input (one line on stderr, no
traceback, nothing on disk damaged), 130 interrupted, 143 terminated (SIGTERM).
"""

import argparse
import json
import os
import re
import signal
import sys
import threading
from typing import List, Optional, Tuple

from experiments.run_dir import Terminated

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it


class UsageError(Exception):
  """Bad input: printed as one line, exit 2."""


def _fail(message: str) -> int:
  print(f'moerl: error: {message}', file=sys.stderr)
  return EXIT_USAGE


def _build_runner(base_dir, gin_files, gin_bindings, **kwargs):
  """Parses gin and builds the Runner; bad input raises UsageError."""
  from experiments import gin_config  # pylint: disable=g-import-not-at-top
  from experiments.runner import Runner  # pylint: disable=g-import-not-at-top
  gin_config.load(gin_files, gin_bindings)
  try:
    return Runner(base_dir, **kwargs)
  except (ValueError, TypeError) as e:
    raise UsageError(f'bad config: {_config_error(e)}') from None


def _warn_unused(gin_bindings, set_by_caller=()) -> None:
  """One warning line per --gin_bindings entry that the built config never
  used (e.g. a SoftMoE parameter on a dense config): such a run trains, but
  not what the binding asks for. Not an error: a sweep may pass one binding
  to variants that use it and variants that do not."""
  from experiments import gin_config  # pylint: disable=g-import-not-at-top
  for binding in gin_config.unused_bindings(gin_bindings, set_by_caller):
    print(f'moerl: warning: --gin_bindings {binding!r} has no effect: nothing '
          'this config builds uses that parameter.', file=sys.stderr)


LABEL_LINE = re.compile(r'^Runner\.variant = .*\n', re.MULTILINE)


def effective_config(gin_files, gin_bindings) -> Tuple[str, List[str]]:
  """Builds the config's Runner (no run directory); returns the parameters it
  used (gin's operative config, without the `Runner.variant` label line) and
  the bindings, of `gin_bindings`, that it does not use. ValueError for bad
  input."""
  import gin  # pylint: disable=g-import-not-at-top
  from experiments import gin_config  # pylint: disable=g-import-not-at-top
  try:
    runner = _build_runner(None, list(gin_files), list(gin_bindings))
  except (UsageError, gin_config.GinConfigError) as e:
    raise ValueError(str(e)) from None
  try:
    return (LABEL_LINE.sub('', gin.operative_config_str()),
            gin_config.unused_bindings(gin_bindings))
  finally:
    runner.close()


def _build_configs(connection) -> None:
  """The child process of `effective_configs`: answers each (gin_files,
  bindings) received with ('ok', effective_config) or ('error', one line),
  until the connection closes."""
  from experiments import gin_config  # pylint: disable=g-import-not-at-top
  while True:
    try:
      request = connection.recv()
    except EOFError:
      return
    try:
      connection.send(('ok', effective_config(*request)))
    except Exception as e:  # pylint: disable=broad-except
      if _is_out_of_memory(e):
        line = _out_of_memory(e)
      elif isinstance(e, ValueError):
        line = gin_config.first_line(e)
      else:  # an error of a configurable that is not a bad value
        line = f'bad config: {type(e).__name__}: {gin_config.first_line(e)}'
      connection.send(('error', line))


def effective_configs(configs):
  """Yields `effective_config(gin_files, bindings)` for each pair of
  `configs`, built one after another in one spawned child process: JAX never
  starts in the calling process, from which a sweep forks its runs.
  ValueError (one line) for bad input. The child starts with Ctrl-C ignored:
  the caller gets it and the child is stopped when the generator closes."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  context = multiprocessing.get_context('spawn')
  connection, child_end = context.Pipe()
  process = context.Process(target=_build_configs, args=(child_end,),
                            daemon=True)
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = (signal.signal(signal.SIGINT, signal.SIG_IGN)
              if in_main_thread else None)
  try:
    process.start()  # SIG_IGN is inherited through exec
  finally:
    if in_main_thread:
      signal.signal(signal.SIGINT, previous)
  child_end.close()
  try:
    for request in configs:
      connection.send(tuple(request))
      try:
        kind, value = connection.recv()
      except EOFError:
        raise ValueError('building the config killed its process (out of '
                         'memory?); use a smaller config') from None
      if kind == 'error':
        raise ValueError(value)
      yield value
  finally:
    connection.close()
    process.terminate()
    process.join()


def _is_out_of_memory(error: BaseException) -> bool:
  """NumPy's MemoryError, or XLA's failure to allocate (RESOURCE_EXHAUSTED,
  or an INTERNAL error that says it ran out of memory)."""
  text = str(error)
  return (isinstance(error, MemoryError) or 'RESOURCE_EXHAUSTED' in text
          or ('INTERNAL' in text and 'out of memory' in text.lower()))


def _out_of_memory(error: BaseException) -> str:
  from experiments import gin_config  # pylint: disable=g-import-not-at-top
  line = gin_config.first_line(error).rstrip('.')
  return (f'out of memory: {line}; use a smaller config (replay_capacity, '
          'network width, number of experts, batch size).')


def _config_error(error: BaseException) -> str:
  """The error's first line, naming the innermost gin configurable that
  raised it (gin appends "In call to configurable 'X'" lines) unless the
  line already does."""
  from experiments import gin_config  # pylint: disable=g-import-not-at-top
  line = gin_config.first_line(error)
  where = re.search(r"In call to configurable '([^']+)'", str(error))
  if where and where.group(1) not in line:
    return f'{line} (in {where.group(1)})'
  return line


def cmd_train(args) -> int:
  import gin  # pylint: disable=g-import-not-at-top
  if not args.gin_files:
    raise UsageError('--gin_files is required: name a config such as '
                     'dqn_softmoe.gin or a path to a .gin file.')
  if args.num_seeds < 1:
    raise UsageError(f'--num_seeds={args.num_seeds} must be >= 1.')
  if args.num_seeds > 1:
    return _train_seeds(args)
  runner = _build_runner(args.base_dir, args.gin_files, args.gin_bindings)
  _warn_unused(args.gin_bindings)
  _run_experiment(runner, gin.operative_config_str())
  print(f'done: metrics in {os.path.join(args.base_dir, "metrics.jsonl")}; '
        f'view with: tensorboard --logdir {args.base_dir}', file=sys.stderr)
  return EXIT_OK


def _run_experiment(experiment, configs) -> None:
  """Runs a Runner's or SeedGroup's experiment, then closes it; a run
  directory that refuses the config is bad input."""
  from experiments.run_dir import RunDirError  # pylint: disable=g-import-not-at-top
  try:
    experiment.run_experiment(configs)
  except RunDirError as e:
    raise UsageError(str(e)) from None
  finally:
    experiment.close()


def _train_seeds(args) -> int:
  """--num_seeds S: seeds k..k+S-1 (k = Runner.seed) in <base_dir>/seed<k>."""
  import gin  # pylint: disable=g-import-not-at-top
  from experiments import gin_config  # pylint: disable=g-import-not-at-top
  from experiments.run_dir import holds_run  # pylint: disable=g-import-not-at-top
  from experiments.seed_group import SeedGroup  # pylint: disable=g-import-not-at-top
  if holds_run(args.base_dir):
    raise UsageError(f'--base_dir {args.base_dir} holds a run of its own; --num_seeds '
                     'writes each seed to <base_dir>/seed<k>: use a new --base_dir.')
  gin_config.load(args.gin_files, args.gin_bindings)
  try:
    first_seed = int(gin.query_parameter('Runner.seed'))
  except ValueError:
    first_seed = 0
  runners, configs = [], []
  for seed in range(first_seed, first_seed + args.num_seeds):
    base_dir = os.path.join(args.base_dir, f'seed{seed}')
    runners.append(_build_runner(base_dir, args.gin_files,
                                 args.gin_bindings + [f'Runner.seed = {seed}']))
    configs.append(gin.operative_config_str())
  _warn_unused(args.gin_bindings)
  try:
    group = SeedGroup(runners)
  except ValueError as e:
    for runner in runners:
      runner.close()
    raise UsageError(f'bad config: {e}') from None
  _run_experiment(group, configs)
  print(f'done: {args.num_seeds} seeds in {args.base_dir}/seed*; view with: '
        f'tensorboard --logdir {args.base_dir}', file=sys.stderr)
  return EXIT_OK


def _run_config(base_dir: str) -> str:
  """The config.gin of an existing run, or UsageError."""
  from experiments.run_dir import RunDir, seed_group_dirs  # pylint: disable=g-import-not-at-top
  config = RunDir(base_dir).config_path
  if not os.path.isfile(config):
    seeds = seed_group_dirs(base_dir)
    if seeds:
      raise UsageError(f'{base_dir} is a --num_seeds group ({", ".join(seeds)}), not '
                       f'one run; pass one seed\'s directory, such as '
                       f'{os.path.join(base_dir, seeds[0])}.')
    raise UsageError(f'{base_dir} is not a moerl run (no config.gin); '
                     'pass the --base_dir of a `moerl train` run.')
  return config


def cmd_eval(args) -> int:
  from experiments.run_dir import RunDirError, atomic_write_json, check_output_files  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = _run_config(args.base_dir)
  if args.episodes < 1:
    raise UsageError(f'--episodes={args.episodes} must be >= 1.')
  eval_path = os.path.join(args.base_dir, 'eval.json')
  runner = _build_runner(args.base_dir, [config], [], num_envs=1)
  try:
    check_output_files(eval_path)
    iteration = runner.restore_agent()
    returns = runner.evaluate_episodes(args.episodes)
  except RunDirError as e:
    raise UsageError(str(e)) from None
  finally:
    runner.close()
  result = {'checkpoint_iteration': iteration, 'episodes': len(returns),
            'returns': returns, 'return_mean': float(np.mean(returns)),
            'return_std': float(np.std(returns)),
            'epsilon_eval': runner.agent.epsilon_eval}
  atomic_write_json(eval_path, result)
  for i, value in enumerate(returns):
    print(f'episode {i}: return {value:.2f}')
  print(f'mean return {result["return_mean"]:.2f} over {len(returns)} '
        f'episodes (checkpoint of iteration {iteration}); wrote {eval_path}')
  return EXIT_OK


def cmd_params(args) -> int:
  from networks.q_network import parameter_table  # pylint: disable=g-import-not-at-top
  if not args.gin_files:
    raise UsageError('--gin_files is required.')
  if args.num_actions < 1:
    raise UsageError(f'--num_actions={args.num_actions} must be >= 1.')
  runner = _build_runner(None, args.gin_files, args.gin_bindings,
                         num_actions=args.num_actions, num_envs=1)
  runner.close()
  # The command sets these two itself; in `moerl train` they take effect.
  _warn_unused(args.gin_bindings, ('Runner.num_envs', 'Runner.num_actions'))
  params = runner.agent.state.online_params
  table = parameter_table(params)
  result = {'total': runner.num_params, 'modules': table,
            'num_actions': args.num_actions, **runner.agent.network.describe()}
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    print(f"{'module':<14}{'parameters':>14}")
    for name, count in table.items():
      print(f'{name:<14}{count:>14,}')
    print(f"{'total':<14}{runner.num_params:>14,}")
  return EXIT_OK


def cmd_sweep(args) -> int:
  from experiments import gin_config, sweeps  # pylint: disable=g-import-not-at-top
  if args.workers < 1:
    raise UsageError(f'--workers={args.workers} must be >= 1.')
  try:
    result = sweeps.run_sweep(
        args.spec, args.out, workers=args.workers, backend=args.backend,
        ray_address=args.ray_address, dry_run=args.dry_run,
        command_prefix=(sys.executable, '-m', 'experiments.cli', 'train'),
        validate_binding=gin_config.validate_binding,
        effective_configs=effective_configs,
        cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
        seeds_per_process=args.seeds_per_process)
  except sweeps.SweepError as e:
    raise UsageError(str(e)) from None
  return EXIT_FAILED if result.failed else EXIT_OK


def cmd_plot(args) -> int:
  from experiments import plots  # pylint: disable=g-import-not-at-top
  try:
    result = plots.plot_runs(args.dir, args.out, last_n=args.last_n,
                             metric=args.metric)
  except plots.PlotError as e:
    raise UsageError(str(e)) from None
  for note in result.notes:
    print(f'note: {note}', file=sys.stderr)
  print(f'{result.num_runs} runs plotted ({result.metric} returns); wrote:')
  for path in result.files:
    print(f'  {path}')
  return EXIT_OK


def cmd_bench(args) -> int:
  from experiments import bench  # pylint: disable=g-import-not-at-top
  results = {'seconds': {}}
  for section in args.sections or bench.SECTIONS:  # report each as it ends
    part = bench.run(sections=[section], quick=args.quick, stream=sys.stderr)
    if not args.json:
      print(bench.format_report(part), flush=True)
    results['seconds'].update(part.pop('seconds'))
    results.update(part)
  total = sum(results['seconds'].values())
  if args.json:
    print(json.dumps(results, indent=2))
  else:
    print(f'\nbench took {total:.0f} s in all')
  return EXIT_OK


def cmd_experts(args) -> int:
  from experiments import experts  # pylint: disable=g-import-not-at-top
  from experiments.run_dir import RunDirError, check_output_files  # pylint: disable=g-import-not-at-top
  config = _run_config(args.base_dir)
  if args.states < 1:
    raise UsageError(f'--states={args.states} must be >= 1.')
  if args.episodes < 0:
    raise UsageError(f'--episodes={args.episodes} must be >= 0.')
  try:
    keep = None if args.keep is None else experts.parse_keep(args.keep)
  except experts.ExpertAnalysisError as e:
    raise UsageError(str(e)) from None
  runner = _build_runner(args.base_dir, [config], [], num_envs=1)
  try:
    if keep is None and runner.agent.network.penultimate_name == 'softmoe':
      keep = experts.default_keep(experts.num_experts_of(runner.agent.network))
    experts.check_analysis_input(runner.agent.network, keep)
    check_output_files(*experts.output_paths(args.base_dir))
    iteration = runner.restore_agent()
    result = experts.expert_subset_analysis(
        runner, keep, num_states=args.states, num_episodes=args.episodes,
        seed=args.seed, checkpoint_iteration=iteration)
  except (experts.ExpertAnalysisError, RunDirError) as e:
    raise UsageError(str(e)) from None
  finally:
    runner.close()
  files = experts.write_outputs(result, args.base_dir)
  print(experts.format_table(result))
  print(f'checkpoint of iteration {iteration}; wrote {", ".join(files)}')
  return EXIT_OK


def cmd_representation(args) -> int:
  from experiments import representation  # pylint: disable=g-import-not-at-top
  try:
    result = representation.run_representation(
        args.out, experts=representation.parse_experts(args.experts),
        steps=args.steps, seed=args.seed)
  except representation.RepresentationError as e:
    raise UsageError(str(e)) from None
  print(representation.format_table(result))
  print(f'wrote {", ".join(result["files"])}')
  return EXIT_OK


class _Parser(argparse.ArgumentParser):
  """argparse with moerl's rule for bad input: one line on stderr, exit 2
  (argparse prints its usage text first; `--help` shows it)."""

  def error(self, message):
    raise SystemExit(_fail(f'{self.prog}: {message} (see `{self.prog} --help`)'))


def _seed(text: str) -> int:
  """argparse type of --seed: an integer in [0, MAX_SEED]."""
  from networks.checks import MAX_SEED  # pylint: disable=g-import-not-at-top
  try:
    seed = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
  if not 0 <= seed <= MAX_SEED:
    raise argparse.ArgumentTypeError(f'{seed} is outside [0, {MAX_SEED}]')
  return seed


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog='moerl', description='Mixtures of Experts in deep RL value networks.')
  sub = parser.add_subparsers(dest='command', required=True)

  def gin_args(p):
    p.add_argument('--gin_files', action='append', default=[],
                   help='gin config (path or shipped name); repeatable')
    p.add_argument('--gin_bindings', action='append', default=[],
                   help="gin binding such as 'SoftMoE.num_experts = 4'; repeatable")

  p = sub.add_parser('train', help='train an agent (resumes if base_dir has a checkpoint)')
  p.add_argument('--base_dir', required=True)
  gin_args(p)
  p.add_argument('--num_seeds', type=int, default=1,
                 help='train seeds k..k+S-1 (k = Runner.seed) in one process, '
                      'vmapped, each in <base_dir>/seed<k>')
  p.set_defaults(func=cmd_train)

  p = sub.add_parser('eval', help='evaluate the latest checkpoint of a run')
  p.add_argument('--base_dir', required=True)
  p.add_argument('--episodes', type=int, default=10)
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser('params', help='parameter count of the configured Q-network')
  gin_args(p)
  p.add_argument('--num_actions', type=int, default=18)
  p.add_argument('--json', action='store_true')
  p.set_defaults(func=cmd_params)

  p = sub.add_parser('sweep', help='run a grid of experiments from a TOML spec')
  p.add_argument('spec', help='sweep spec (.toml); shipped specs live in configs/sweeps/')
  p.add_argument('--out', required=True, help='directory holding one run per grid point')
  p.add_argument('--workers', type=int, default=1, help='runs executed concurrently')
  p.add_argument('--backend', choices=('local', 'ray'), default='local')
  p.add_argument('--ray_address', default=None,
                 help="existing Ray cluster (e.g. 'auto'); default starts a local Ray")
  p.add_argument('--cpus_per_run', type=float, default=None,
                 help='CPUs per Ray task (--backend ray only; default 1)')
  p.add_argument('--gpus_per_run', type=float, default=None,
                 help='GPUs per Ray task (--backend ray only; default 0)')
  p.add_argument('--dry_run', action='store_true', help='print the plan, run nothing')
  p.add_argument('--seeds_per_process', action='store_true',
                 help='train consecutive seeds of a run in one process '
                      '(moerl train --num_seeds)')
  p.set_defaults(func=cmd_sweep)

  p = sub.add_parser('plot', help='learning and scaling curves from runs under DIR')
  p.add_argument('dir')
  p.add_argument('--out', default=None, help='output directory (default DIR/plots)')
  p.add_argument('--last_n', type=int, default=None,
                 help='iterations averaged for final scores (default 10%% of a run)')
  p.add_argument('--metric', choices=('train', 'eval'), default=None,
                 help='returns to plot (default: training returns, or evaluation '
                      'returns when no run logged training returns)')
  p.set_defaults(func=cmd_plot)

  p = sub.add_parser('bench', help='speed and memory figures on this machine')
  p.add_argument('--networks', dest='sections', action='append_const',
                 const='networks', help='update cost per penultimate type')
  p.add_argument('--agent', dest='sections', action='append_const',
                 const='agent', help='end-to-end Dopamine protocol and replay')
  p.add_argument('--envs', dest='sections', action='append_const',
                 const='envs', help='environment steps/s, single and vector')
  p.add_argument('--throughput', dest='sections', action='append_const',
                 const='throughput',
                 help='vector envs, fused updates, many seeds')
  p.add_argument('--quick', action='store_true', help='fewer repetitions')
  p.add_argument('--json', action='store_true')
  p.set_defaults(func=cmd_bench)

  p = sub.add_parser('experts', help='top-k expert subsets of a Soft MoE run '
                     '(Chung et al.): agreement with the full network')
  p.add_argument('--base_dir', required=True)
  p.add_argument('--keep', default=None,
                 help='comma-separated numbers of experts kept (default: the '
                 'powers of two below the expert count, 1,2,4 for 8 experts)')
  p.add_argument('--states', type=int, default=500,
                 help='states visited by the greedy agent to score')
  p.add_argument('--episodes', type=int, default=3,
                 help='episodes per pruned agent (0 skips them)')
  p.add_argument('--seed', type=_seed, default=0)
  p.set_defaults(func=cmd_experts)

  p = sub.add_parser('representation', help='1 vs many Soft MoE experts of '
                     'the same total width fitting ||x||^2 (Chung et al.)')
  p.add_argument('--out', default='runs/representation',
                 help='output directory for representation.json/.png')
  p.add_argument('--steps', type=int, default=None,
                 help='Adam steps per model (default: the module default)')
  p.add_argument('--seed', type=_seed, default=0)
  p.add_argument('--experts', default='1,8',
                 help='comma-separated expert counts; 1 is the single-expert control')
  p.set_defaults(func=cmd_representation)
  return parser


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # --help (0) or a usage error (2, its line printed)
    return e.code if isinstance(e.code, int) else EXIT_OK
  try:  # a second or so of imports (JAX): Ctrl-C there is an interrupt too
    from experiments.gin_config import GinConfigError  # pylint: disable=g-import-not-at-top
  except KeyboardInterrupt:
    print('moerl: interrupted', file=sys.stderr)
    return EXIT_INTERRUPTED
  # SIGTERM stops a run as Ctrl-C does (status.json says so; a sweep passes it
  # on to its runs). Only the main thread may handle signals.
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = (signal.signal(signal.SIGTERM, _raise_terminated)
              if in_main_thread else None)
  for name in ('base_dir', 'out', 'dir', 'spec'):  # a '~' the shell left (--out=~/x)
    if isinstance(getattr(args, name, None), str):
      setattr(args, name, os.path.expanduser(getattr(args, name)))
  try:
    return args.func(args)
  except (UsageError, GinConfigError) as e:
    return _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if not _is_out_of_memory(e):  # e.g. a replay buffer too large to hold
      raise
    return _fail(_out_of_memory(e))
  except Terminated:
    print('moerl: terminated (SIGTERM)', file=sys.stderr)
    return EXIT_TERMINATED
  except KeyboardInterrupt:
    print('moerl: interrupted', file=sys.stderr)
    return EXIT_INTERRUPTED
  finally:
    if in_main_thread:  # None: the handler was not set from Python
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if previous is None else previous)


if __name__ == '__main__':
  sys.exit(main())
