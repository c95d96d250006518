"""One expert against many of the same total expert width (Chung et al.,
"Beyond Parameter Count: Implicit Bias in Soft MoE"); the parameter counts
differ only by the E d second-layer biases and d E router entries (4.8% more
at the default 8 experts; see "reported" below).

Their representation result: a Soft MoE layer with a single expert cannot
represent some simple convex functions of its input, while the same layer
split into several smaller experts (same total expert parameters) can. The
reason is the Soft MoE bottleneck: with one slot per expert, a single expert
only ever sees ONE convex mix of the input tokens (the dispatch-weighted
average), and every output token is a copy of that expert's one output, so
the layer's output is a function of a d-dim summary of a T x d input. E
experts see E different mixes.

The experiment, kept small enough for a CPU:
  input    X: T tokens of d dims, every entry i.i.d. N(0, 1);
  target   f(X) = ||X||_F^2 = sum_t ||x_t||^2, convex in the whole input;
  model    networks.soft_moe.SoftMoE(num_experts=E, slots_per_expert=1,
           expert_hidden_units=H / E) followed by a FIXED readout, the sum of
           all output tokens' entries (no parameters, so the only learned
           parts are phi and the experts; the experts' last Dense layer can
           scale and shift the readout freely);
  training Adam on the MSE, a fresh minibatch from the input distribution
           at every step (online regression: no overfitting, the error
           measures what the layer can represent and reach); every model
           sees the same minibatches and the same held-out points;
  reported held-out MSE and relative MSE (MSE / variance of f on the
           held-out set: 1.0 is what predicting the mean achieves), with
           the parameter counts of every model (expert parameters are equal
           up to the second-layer biases, E * d; phi has d * E entries).

`run_representation(out_dir, experts=(1, 8), steps=...)` runs it and writes
representation.json and representation.png (loss curves, log y);
`moerl representation` wires it.
"""

import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.run_dir import RunDirError, atomic_save_figure, atomic_write_json, check_output_files
from networks.q_network import count_parameters
from networks.soft_moe import SoftMoE

DEFAULTS = dict(num_tokens=4, token_dim=4, total_hidden_units=128,
                steps=3000, batch_size=256, learning_rate=3e-3,
                num_test=4096, eval_every=100)


class RepresentationError(ValueError):
  """Bad input to the representation experiment (one line, for the CLI)."""


def parse_experts(text: str) -> List[int]:
  """'1,8' -> [1, 8] (sorted, unique); RepresentationError otherwise."""
  try:
    values = [int(v.strip()) for v in str(text).split(',')]
  except ValueError:
    raise RepresentationError(
        f"--experts='{text}' is not a comma-separated list of integers "
        '(for example 1,8).') from None
  return sorted(set(values))


def target_fn(x: jax.Array) -> jax.Array:
  """f(X) = sum over tokens of ||x_t||^2: [B, T, d] -> [B]."""
  return jnp.sum(x * x, axis=(1, 2))


def sample_inputs(key, batch: int, num_tokens: int, token_dim: int):
  return jax.random.normal(key, (batch, num_tokens, token_dim))


def make_layer(num_experts: int, total_hidden_units: int) -> SoftMoE:
  return SoftMoE(num_experts=num_experts,
                 expert_hidden_units=total_hidden_units // num_experts,
                 slots_per_expert=1, parent=None)


def predict(layer: SoftMoE, params, x) -> jax.Array:
  """Soft MoE then the fixed readout (sum of every output token's entries)."""
  outputs, _ = layer.apply({'params': params}, x)  # [B, T, d]
  return jnp.sum(outputs, axis=(1, 2))


# A bound on --steps: one PRNG key per step is drawn up front (8 bytes each),
# and 10M steps of the default model take hours on a CPU.
MAX_STEPS = 10_000_000


def train_model(num_experts: int, *, seed: int = 0, steps: int,
                num_tokens: int, token_dim: int, total_hidden_units: int,
                batch_size: int, learning_rate: float, num_test: int,
                eval_every: int) -> Dict[str, Any]:
  """Trains one Soft MoE layer on f; returns its errors and loss curves."""
  layer = make_layer(num_experts, total_hidden_units)
  data_key, test_key, init_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  # Model-independent streams: every expert count sees the same data.
  x_test = sample_inputs(test_key, num_test, num_tokens, token_dim)
  y_test = target_fn(x_test)
  params = layer.init(init_key, x_test[:1])['params']
  optimizer = optax.adam(learning_rate)

  def test_mse(p):
    return jnp.mean((predict(layer, p, x_test) - y_test) ** 2)

  def step(carry, key):
    p, opt_state = carry
    x = sample_inputs(key, batch_size, num_tokens, token_dim)
    y = target_fn(x)
    loss, grads = jax.value_and_grad(
        lambda q: jnp.mean((predict(layer, q, x) - y) ** 2))(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  def block(carry, keys):  # eval_every steps, then one held-out evaluation
    carry, losses = jax.lax.scan(step, carry, keys)
    return carry, (losses, test_mse(carry[0]))

  # Exactly `steps` steps: full blocks of eval_every, then the remainder.
  full, rest = divmod(steps, eval_every)
  keys = jax.random.split(data_key, steps)
  chunks = [keys[:full * eval_every].reshape((full, eval_every, 2))] if full else []
  if rest:
    chunks.append(keys[full * eval_every:].reshape((1, rest, 2)))
  start = time.time()
  run = jax.jit(lambda c, k: jax.lax.scan(block, c, k))
  carry, train_parts, test_parts = (params, optimizer.init(params)), [], []
  for chunk in chunks:
    carry, (train_loss, test_loss) = run(carry, chunk)
    train_parts.append(np.asarray(train_loss).reshape(-1))
    test_parts.append(np.asarray(test_loss))
  params = carry[0]
  train_losses = np.concatenate(train_parts)
  test_losses = np.concatenate(test_parts)
  final_mse = float(test_mse(params))
  seconds = time.time() - start
  variance = float(jnp.var(y_test))
  expert_params = count_parameters(params['experts'])
  return {
      'num_experts': num_experts,
      'expert_hidden_units': total_hidden_units // num_experts,
      'slots_per_expert': 1,
      'expert_parameters': expert_params,
      'router_parameters': int(params['phi'].size),
      'total_parameters': count_parameters(params),
      'test_mse': final_mse,
      'relative_test_mse': final_mse / variance,
      'target_variance': variance,
      'train_loss': [float(v) for v in train_losses],
      'test_loss_steps': [min((i + 1) * eval_every, steps)
                          for i in range(len(test_losses))],
      'test_loss': [float(v) for v in test_losses],
      'seconds': seconds,
  }


def run_representation(out_dir: Optional[str], experts: Sequence[int] = (1, 8),
                       steps: Optional[int] = None, seed: int = 0,
                       **overrides) -> Dict[str, Any]:
  """Trains one Soft MoE per expert count; writes json + png into out_dir.

  `overrides` replace entries of DEFAULTS (num_tokens, token_dim,
  total_hidden_units, batch_size, learning_rate, num_test, eval_every).
  With out_dir None nothing is written.
  """
  unknown = set(overrides) - set(DEFAULTS)
  if unknown:
    raise TypeError(f'unknown settings: {", ".join(sorted(unknown))}')
  settings = dict(DEFAULTS, **overrides)
  if steps is not None:
    settings['steps'] = steps
  experts = sorted(set(int(e) for e in experts))
  hidden = settings['total_hidden_units']
  if not 1 <= settings['steps'] <= MAX_STEPS:
    raise RepresentationError(f"--steps={settings['steps']} must be between 1 and "
                              f"{MAX_STEPS:,} (each model's keys are drawn up front).")
  if not experts:
    raise RepresentationError('--experts names no expert count: pass e.g. 1,8.')
  bad = [e for e in experts if e < 1 or hidden % e]
  if bad:
    raise RepresentationError(
        f'--experts value(s) {", ".join(map(str, bad))} out of range: each must '
        f'be >= 1 and divide the total expert hidden units, {hidden}.')
  settings['eval_every'] = max(1, min(settings['eval_every'], settings['steps']))
  if out_dir is not None:
    json_path = os.path.join(out_dir, 'representation.json')
    png_path = os.path.join(out_dir, 'representation.png')
    try:
      os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
      raise RepresentationError(
          f'--out {out_dir} cannot be created ({e.strerror}).') from None
    try:
      check_output_files(json_path, png_path)
    except RunDirError as e:
      raise RepresentationError(str(e)) from None
  models = [train_model(e, seed=seed, **settings) for e in experts]
  result = {
      'target': 'f(X) = sum_t ||x_t||^2, x entries i.i.d. N(0, 1)',
      'model': ('SoftMoE(num_experts=E, slots_per_expert=1, '
                'expert_hidden_units=total/E) -> sum of all output entries'),
      'seed': seed,
      'settings': settings,
      'models': models,
  }
  if out_dir is not None:
    atomic_write_json(json_path, result)
    plot_curves(result, png_path)
    result['files'] = [json_path, png_path]
  return result


def _smooth(values, window):
  values = np.asarray(values)
  if len(values) < window:
    return values
  kernel = np.ones(window) / window
  return np.convolve(values, kernel, mode='valid')


def plot_curves(result: Dict[str, Any], path: str) -> None:
  """Train (smoothed) and held-out MSE against steps, log y (atomic write)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7, 4.5), layout='constrained')
  ax = fig.subplots()
  window = max(1, result['settings']['eval_every'] // 2)
  for i, m in enumerate(result['models']):
    color = f'C{i}'
    label = (f"{m['num_experts']} expert{'s' if m['num_experts'] > 1 else ''} "
             f"x {m['expert_hidden_units']} hidden "
             f"({m['total_parameters']:,} params)")
    train = _smooth(m['train_loss'], window)
    ax.plot(np.arange(len(train)) + window, train, color=color, alpha=0.45,
            linewidth=1, label=f'{label}, train')
    ax.plot(m['test_loss_steps'], m['test_loss'], 'o-', color=color,
            markersize=3, label=f'{label}, held-out')
  ax.set_yscale('log')
  ax.set_xlabel('Adam steps')
  ax.set_ylabel('MSE on f(X) = sum_t ||x_t||^2')
  ax.set_title('Soft MoE at equal expert parameter count: 1 vs many experts')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  atomic_save_figure(fig, path)


def format_table(result: Dict[str, Any]) -> str:
  lines = [f"{'experts':>7} {'hidden/expert':>13} {'expert params':>13} "
           f"{'total params':>12} {'test MSE':>10} {'relative':>9}"]
  for m in result['models']:
    lines.append(
        f"{m['num_experts']:>7} {m['expert_hidden_units']:>13} "
        f"{m['expert_parameters']:>13,} {m['total_parameters']:>12,} "
        f"{m['test_mse']:>10.4f} {m['relative_test_mse']:>9.4f}")
  lines.append(f"target {result['target']}; held-out variance "
               f"{result['models'][0]['target_variance']:.3f}")
  return '\n'.join(lines)
