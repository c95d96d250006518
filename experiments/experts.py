"""Expert subsets of a trained Soft MoE Q-network (Chung et al., "Beyond
Parameter Count: Implicit Bias in Soft MoE").

With many small experts, the experts that matter for one input can be read
off the routing: rank the experts by their total combine weight for that
state (summed over tokens and slots) and run only the top k. This module
measures, on states visited by the trained greedy agent, how closely the
pruned network follows the full one, against a control that keeps k experts
drawn at random per state:

  agreement     fraction of states where argmax Q of the pruned network
                equals argmax Q of the full network;
  mean_abs_dq   mean |Q_pruned - Q_full| over states and actions;
  combine_mass  mean share of the combine weight carried by the kept experts;
  flops_saved   1 - k / E, the fraction of expert FLOPs not spent;
  returns       episode returns (epsilon_eval) of an agent that chooses its
                top-k (or random-k) mask afresh at every step.

Pruning multiplies the dropped experts' outputs by 0 (`expert_mask` of the
Q-network): numerically what skipping them computes. The routing weights need
only the tokens and phi, not the experts, so a deployed pruned network pays
for the kept experts only; here the ranking is read from one full forward
pass, which is exact and simple, and the FLOPs saving is reported, not timed.

`expert_subset_analysis(runner, keep, ...)` does the work on a Runner whose
agent was restored from a checkpoint; `write_outputs` writes experts.json and
experts.png; `format_table` renders the printed table. `moerl experts` wires
them.
"""

import contextlib
import functools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.run_dir import atomic_save_figure, atomic_write_json

MODES = ('topk', 'random')
_CHUNK = 128  # states per forward pass when scoring many states


class ExpertAnalysisError(ValueError):
  """Bad input to the expert-subset analysis (one line, for the CLI)."""


def parse_keep(text: str) -> List[int]:
  """'1,2,4' -> [1, 2, 4] (sorted, unique); ExpertAnalysisError otherwise."""
  values = []
  for item in str(text).split(','):
    item = item.strip()
    try:
      values.append(int(item))
    except ValueError:
      raise ExpertAnalysisError(
          f"--keep='{text}' is not a comma-separated list of integers "
          "(for example 1,2,4).") from None
  return sorted(set(values))


def default_keep(experts: int) -> List[int]:
  """The expert counts analysed when --keep is not given: the powers of two
  below `experts` (1, 2, 4 for 8 experts), since keeping all of them is the
  full network; [1] for a single expert."""
  return [2**i for i in range(max(1, (experts - 1).bit_length()))]


def num_experts_of(network) -> int:
  return int(network.penultimate.num_experts)


def check_analysis_input(network, keep: Sequence[int]) -> int:
  """Refuses non-Soft-MoE networks and out-of-range k; returns the expert count."""
  if network.penultimate_name != 'softmoe':
    raise ExpertAnalysisError(
        f"this run's penultimate layer is '{network.penultimate_name}', not "
        "'softmoe': the expert-subset analysis needs Soft MoE combine weights.")
  experts = num_experts_of(network)
  if not keep:
    raise ExpertAnalysisError('--keep names no expert count: pass e.g. 1,2,4.')
  bad = [k for k in keep if not 1 <= k <= experts]
  if bad:
    raise ExpertAnalysisError(
        f'--keep value(s) {", ".join(map(str, bad))} out of range: each k must '
        f'be between 1 and the number of experts, {experts}.')
  return experts


# -- Forward passes. -------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _forward_fns(network):
  """Jitted (full, masked) forward passes of `network` (deterministic)."""

  def full(params, observations):
    out = network.apply({'params': params}, observations, deterministic=True)
    return out.q_values, out.diagnostics['combine_weights'].sum(axis=(1, 3))

  def masked(params, observations, mask):
    out = network.apply({'params': params}, observations, deterministic=True,
                        expert_mask=mask)
    return out.q_values

  return jax.jit(full), jax.jit(masked)


def expert_scores(network, params, observations) -> tuple:
  """observations [B, ...] -> (q_full [B, A], combine mass per expert [B, E])."""
  full, _ = _forward_fns(network)
  qs, scores = [], []
  for start in range(0, len(observations), _CHUNK):
    q, s = full(params, jnp.asarray(observations[start:start + _CHUNK]))
    qs.append(np.asarray(q))
    scores.append(np.asarray(s))
  return np.concatenate(qs), np.concatenate(scores)


def masked_q_values(network, params, observations, masks) -> np.ndarray:
  _, masked = _forward_fns(network)
  qs = []
  for start in range(0, len(observations), _CHUNK):
    qs.append(np.asarray(masked(
        params, jnp.asarray(observations[start:start + _CHUNK]),
        jnp.asarray(masks[start:start + _CHUNK], jnp.float32))))
  return np.concatenate(qs)


def topk_masks(scores: np.ndarray, k: int) -> np.ndarray:
  """[B, E] combine mass -> [B, E] 0/1 mask of the k largest (ties: lower index)."""
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  mask = np.zeros_like(scores, dtype=np.float32)
  np.put_along_axis(mask, order, 1.0, axis=1)
  return mask


def random_masks(batch: int, experts: int, k: int,
                 rng: np.random.Generator) -> np.ndarray:
  """[B, E] masks each keeping k experts drawn uniformly without replacement."""
  order = np.argsort(rng.random((batch, experts)), axis=1)[:, :k]
  mask = np.zeros((batch, experts), np.float32)
  np.put_along_axis(mask, order, 1.0, axis=1)
  return mask


# -- Environment interaction. ----------------------------------------------------
def collect_states(runner, num_states: int, seed: int) -> np.ndarray:
  """`num_states` stacked observations visited by the greedy (eval-mode) agent."""
  states = []
  with contextlib.closing(runner.eval_steps(seed)) as steps:
    for observations, _ in steps:
      states.append(observations[0].copy())
      if len(states) >= num_states:
        break
  return np.stack(states)


def run_episodes(runner, num_episodes: int, seed: int, k: Optional[int] = None,
                 mode: str = 'full') -> List[float]:
  """Returns of `num_episodes` episodes with epsilon_eval.

  mode 'full' uses every expert; 'topk' keeps, at every step, the k experts
  with the largest combine mass for that step's state; 'random' keeps k
  experts drawn at random at every step. Every mode replays the same env
  seeds and exploration draws.
  """
  if mode not in ('full', *MODES):
    raise ValueError(f"mode={mode!r} is unknown: use one of full, {', '.join(MODES)}.")
  agent = runner.agent
  network, params = agent.network, agent.state.online_params
  experts = num_experts_of(network)
  rng = np.random.default_rng([seed, 1])  # exploration
  mask_rng = np.random.default_rng([seed, 2])  # random-k masks

  def policy(observation):
    if mode == 'full':
      q, _ = expert_scores(network, params, observation)
    elif mode == 'topk':
      _, scores = expert_scores(network, params, observation)
      q = masked_q_values(network, params, observation, topk_masks(scores, k))
    else:  # 'random'
      q = masked_q_values(network, params, observation,
                          random_masks(1, experts, k, mask_rng))
    action = int(np.argmax(q[0]))
    if rng.random() < agent.epsilon_eval:
      action = int(rng.integers(agent.num_actions))
    return np.array([action])

  return runner.evaluate_episodes(num_episodes, seed=seed, policy=policy)


# -- The analysis. ---------------------------------------------------------------
def _subset_metrics(q_full, q_pruned, scores, masks) -> Dict[str, float]:
  share = scores / np.maximum(scores.sum(axis=1, keepdims=True), 1e-12)
  return {
      'agreement': float(np.mean(np.argmax(q_pruned, 1) == np.argmax(q_full, 1))),
      'mean_abs_dq': float(np.mean(np.abs(q_pruned - q_full))),
      'combine_mass': float(np.mean(np.sum(share * masks, axis=1))),
  }


def _mean(values):
  return float(np.mean(values)) if values else None


def expert_subset_analysis(runner, keep: Sequence[int], num_states: int = 500,
                           num_episodes: int = 3, seed: int = 0,
                           checkpoint_iteration: Optional[int] = None
                           ) -> Dict[str, Any]:
  """Top-k (by combine mass) against random-k expert subsets; see module doc.

  `runner.agent` must hold the trained parameters (`runner.restore_agent()`).
  Raises ExpertAnalysisError for a non-Soft-MoE network or a k out of range.
  """
  keep = sorted(set(int(k) for k in keep))
  network = runner.agent.network
  experts = check_analysis_input(network, keep)
  if num_states < 1:
    raise ExpertAnalysisError(f'--states={num_states} must be >= 1.')
  if num_episodes < 0:
    raise ExpertAnalysisError(f'--episodes={num_episodes} must be >= 0.')
  params = runner.agent.state.online_params
  states = collect_states(runner, num_states, seed)
  q_full, scores = expert_scores(network, params, states)
  rng = np.random.default_rng([seed, 0])
  episode_seed = seed + 1
  full_returns = run_episodes(runner, num_episodes, episode_seed)
  rows = []
  for k in keep:
    row = {'k': k, 'flops_saved': 1.0 - k / experts}
    for mode in MODES:
      masks = (topk_masks(scores, k) if mode == 'topk'
               else random_masks(len(states), experts, k, rng))
      q = masked_q_values(network, params, states, masks)
      metrics = _subset_metrics(q_full, q, scores, masks)
      returns = run_episodes(runner, num_episodes, episode_seed, k, mode)
      metrics.update(returns=returns, return_mean=_mean(returns))
      row[mode] = metrics
    rows.append(row)
  return {
      'game': runner.env.name,
      'checkpoint_iteration': checkpoint_iteration,
      'num_experts': experts,
      'num_states': int(len(states)),
      'num_episodes': num_episodes,
      'seed': seed,
      'epsilon_eval': float(runner.agent.epsilon_eval),
      'ranking': 'total combine weight per expert (sum over tokens and slots)',
      'full': {'returns': full_returns, 'return_mean': _mean(full_returns)},
      'keep': rows,
      'mean_agreement': {m: float(np.mean([r[m]['agreement'] for r in rows]))
                         for m in MODES},
      'mean_abs_dq': {m: float(np.mean([r[m]['mean_abs_dq'] for r in rows]))
                      for m in MODES},
  }


# -- Outputs. --------------------------------------------------------------------
def plot_results(result: Dict[str, Any], path: str) -> None:
  """Agreement and mean |dQ| against k, top-k against random-k (atomic write)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  ks = [r['k'] for r in result['keep']]
  fig = Figure(figsize=(10, 4), layout='constrained')
  ax_agree, ax_dq = fig.subplots(1, 2)
  styles = {'topk': ('top-k by combine weight', 'o-'),
            'random': ('random k (baseline)', 's--')}
  for mode, (label, style) in styles.items():
    ax_agree.plot(ks, [r[mode]['agreement'] for r in result['keep']], style,
                  label=label)
    ax_dq.plot(ks, [r[mode]['mean_abs_dq'] for r in result['keep']], style,
               label=label)
  ax_agree.set_xlabel('experts kept (k)')
  ax_agree.set_ylabel('greedy-action agreement with full network')
  ax_agree.set_ylim(-0.02, 1.02)
  ax_dq.set_xlabel('experts kept (k)')
  ax_dq.set_ylabel('mean |Q_pruned - Q_full|')
  for ax in (ax_agree, ax_dq):
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f"{result['game']}: Soft MoE with {result['num_experts']} "
               f"experts, {result['num_states']} states")
  atomic_save_figure(fig, path)


def output_paths(base_dir: str) -> Tuple[str, str]:
  """Where `write_outputs` writes: experts.json and experts.png."""
  return (os.path.join(base_dir, 'experts.json'),
          os.path.join(base_dir, 'experts.png'))


def write_outputs(result: Dict[str, Any], base_dir: str) -> List[str]:
  json_path, png_path = output_paths(base_dir)
  atomic_write_json(json_path, result)
  plot_results(result, png_path)
  return [json_path, png_path]


def _fmt(value, spec):
  return format('n/a', f'>{spec.split(".")[0]}') if value is None else format(value, spec)


def format_table(result: Dict[str, Any]) -> str:
  lines = [
      f"{'k':>3} {'saved':>6} | {'agree top-k':>11} {'agree rand':>10} | "
      f"{'|dQ| top-k':>10} {'|dQ| rand':>10} | {'ret top-k':>9} "
      f"{'ret rand':>9}"]
  for r in result['keep']:
    t, s = r['topk'], r['random']
    lines.append(
        f"{r['k']:>3} {r['flops_saved']:>6.0%} | {t['agreement']:>11.3f} "
        f"{s['agreement']:>10.3f} | {t['mean_abs_dq']:>10.4f} "
        f"{s['mean_abs_dq']:>10.4f} | {_fmt(t['return_mean'], '9.1f')} "
        f"{_fmt(s['return_mean'], '9.1f')}")
  lines.append(f"full network ({result['num_experts']} experts): mean return "
               f"{_fmt(result['full']['return_mean'], '.1f')} over "
               f"{result['num_episodes']} episodes")
  return '\n'.join(lines)
