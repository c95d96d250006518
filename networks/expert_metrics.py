"""Expert metrics from one forward pass's diagnostics (no extra forward).

`expert_metrics(output)` turns a QNetwork's `NetworkOutput` into a flat dict of
`moe/...` values, jit-friendly (arrays only):
  moe/expert_share [E]    Soft MoE: combine mass per expert (sums to 1);
                          Top-k / Expert-Choice: share of routed tokens.
  moe/dispatch_entropy    Soft MoE: mean entropy of a slot's weights over tokens.
  moe/combine_entropy     Soft MoE: mean entropy of a token's weights over slots.
  moe/router_entropy      Top-k / Expert-Choice: mean entropy of router probs.
  moe/dropped_fraction    Top-k: assignments lost to capacity overflow.
  moe/dormant_0 [E], moe/dormant_0.1 [E]
                          per-expert fraction of dormant hidden units (Sokar et
                          al., 2023: a unit's mean |activation| over the batch
                          divided by the layer mean, <= tau).
  moe/features_gram [B, B] the Gram matrix of the penultimate features, from
                          which `srank_from_gram` gives the effective rank
                          (srank, Kumar et al., 2021, delta = 0.01) on the host
                          once per iteration: an SVD inside the jitted step
                          costs 20x the step on CPU.
Non-MoE networks get only `moe/features_gram`.
"""

from typing import Dict, Union

import jax
import jax.numpy as jnp
import numpy as np

DORMANT_THRESHOLDS = (0.0, 0.1)


def _entropy(p, axis):
  return -jnp.sum(p * jnp.log(p + 1e-12), axis=axis)


def dormant_fraction(hidden, tau: float):
  """hidden [B, E, S, h] -> [E] fraction of units with normalised activity <= tau."""
  activity = jnp.abs(hidden).mean(axis=(0, 2))  # [E, h]
  score = activity / (activity.mean(axis=-1, keepdims=True) + 1e-9)
  return jnp.mean(score <= tau, axis=-1)


GRAM_KEY = 'moe/features_gram'


def srank_from_gram(gram: np.ndarray, delta: float = 0.01) -> Union[int, float]:
  """Smallest k whose top-k singular values of F hold 1 - delta of their sum.

  `gram` = F F^T; the singular values of F are the square roots of its
  eigenvalues. 0 when F is zero (every feature dead), like its rank; NaN
  when `gram` is not finite (a diverged network), which the log writes as null.
  """
  gram = np.asarray(gram, np.float64)
  if not np.all(np.isfinite(gram)):
    return float('nan')
  eigenvalues = np.linalg.eigvalsh(gram)[::-1]
  singular = np.sqrt(np.clip(eigenvalues, 0.0, None))
  if not singular.sum() > 0:
    return 0
  cumulative = np.cumsum(singular) / singular.sum()
  return int(np.sum(cumulative < 1.0 - delta) + 1)


def expert_metrics(output) -> Dict[str, jax.Array]:
  d = output.diagnostics
  features = output.features  # [B, F]
  metrics = {GRAM_KEY: features @ features.T}  # [B, B]
  if 'combine_weights' in d and 'dispatch_weights' in d:  # Soft MoE
    combine, dispatch = d['combine_weights'], d['dispatch_weights']  # [B, T, E, S]
    b, t, e, s = combine.shape
    metrics['moe/expert_share'] = combine.sum(axis=3).mean(axis=(0, 1))
    metrics['moe/combine_entropy'] = _entropy(
        combine.reshape((b, t, e * s)), -1).mean()
    metrics['moe/dispatch_entropy'] = _entropy(dispatch, 1).mean()
  elif 'router_probs' in d:  # Top-k or Expert-Choice
    mask = d['dispatch_mask']
    routed = (mask.sum(axis=(0, 1, 3)) if mask.ndim == 4 and 'dropped_fraction' in d
              else mask.sum(axis=(0, 2, 3)))  # [E]
    metrics['moe/expert_share'] = routed / jnp.maximum(routed.sum(), 1.0)
    metrics['moe/router_entropy'] = _entropy(d['router_probs'], -1).mean()
    if 'dropped_fraction' in d:
      metrics['moe/dropped_fraction'] = d['dropped_fraction']
  if 'expert_hidden' in d:
    for tau in DORMANT_THRESHOLDS:
      metrics[f'moe/dormant_{tau:g}'] = dormant_fraction(d['expert_hidden'], tau)
  return metrics
