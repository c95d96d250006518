"""Top-k MoE (tokens choose experts; Shazeer et al. 2017, Switch, GShard).

Within ONE observation: a router Dense(E) gives probabilities p [T, E]; each
token picks its k most probable experts with gates g = p (or p renormalised
over the chosen k with `normalize_gates`). Each expert has a buffer of
capacity = ceil(capacity_factor * T * k / E) slots, filled by priority: all
first choices (in token order) before any second choice, and so on. An
assignment that finds its expert's buffer full overflows:
  - `overflow='drop'`: it contributes nothing (a token whose every choice
    overflowed outputs zeros);
  - `overflow='pass_through'`: it contributes gate * token (identity expert).
Output for token t: sum over its kept choices of gate * expert(token).

Router noise (`router_noise_std` > 0) adds Gaussian noise to the router logits
while training (rng stream 'noise'). Auxiliary losses, each off at weight 0:
  importance: squared coefficient of variation of per-expert summed probability;
  load: E * sum_e f_e * P_e (Switch), f_e = share of first choices, P_e = mean p;
  z: mean over tokens of logsumexp(router logits)^2 (ST-MoE).
"""

import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from networks.checks import is_int
from networks.encoders import XAVIER
from networks.experts import Experts, check_expert_args

OVERFLOW_POLICIES = ('drop', 'pass_through')


def router_probabilities(module: nn.Module, tokens, num_experts: int,
                         noise_std: float, deterministic: bool):
  """Router logits and softmax probabilities [B, T, E] (noise when training)."""
  logits = nn.Dense(num_experts, kernel_init=XAVIER, name='router')(tokens)
  if noise_std > 0 and not deterministic:
    logits = logits + noise_std * jax.random.normal(
        module.make_rng('noise'), logits.shape)
  return logits, jax.nn.softmax(logits, axis=-1)


def importance_loss(probs):
  """Squared coefficient of variation of expert importance, per observation."""
  importance = probs.sum(axis=1)  # [B, E]
  mean = importance.mean(axis=-1)
  return jnp.mean(importance.var(axis=-1) / (mean ** 2 + 1e-10))


def load_loss(probs, first_choice):
  """Switch load-balancing loss: E * sum_e f_e P_e, per observation."""
  num_experts = probs.shape[-1]
  f = jax.nn.one_hot(first_choice, num_experts).mean(axis=1)  # [B, E]
  p = probs.mean(axis=1)  # [B, E]
  return jnp.mean(num_experts * jnp.sum(f * p, axis=-1))


def z_loss(logits):
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


@gin.configurable
class TopKMoE(nn.Module):
  num_experts: int = 8
  k: int = 1
  expert_hidden_units: int = 512
  capacity_factor: float = 1.0
  overflow: str = 'drop'
  router_noise_std: float = 0.0
  normalize_gates: bool = False
  importance_loss_weight: float = 0.0
  load_loss_weight: float = 0.0
  z_loss_weight: float = 0.0

  def __post_init__(self):
    check_expert_args('TopKMoE', self.num_experts, self.expert_hidden_units,
                      self.capacity_factor)
    if not (is_int(self.k) and 1 <= self.k <= self.num_experts):
      raise ValueError(f'TopKMoE.k={self.k} is out of range: use 1 <= k <= '
                       f'num_experts ({self.num_experts}).')
    if self.overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"TopKMoE.overflow='{self.overflow}' is unknown: use "
                       f'one of {", ".join(OVERFLOW_POLICIES)}.')
    if self.router_noise_std < 0:
      raise ValueError(f'TopKMoE.router_noise_std={self.router_noise_std} '
                       'must be >= 0.')
    super().__post_init__()

  def capacity(self, num_tokens: int) -> int:
    """Slots per expert buffer."""
    return math.ceil(self.capacity_factor * num_tokens * self.k /
                     self.num_experts)

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True, expert_mask=None,
               noisy: bool = False):
    b, t, _ = tokens.shape  # [B, T, d]
    e, k, c = self.num_experts, self.k, self.capacity(t)
    logits, probs = router_probabilities(self, tokens, e, self.router_noise_std,
                                         deterministic)  # [B, T, E]
    gates, choice = jax.lax.top_k(probs, k)  # [B, T, k]
    if self.normalize_gates:
      gates = gates / gates.sum(axis=-1, keepdims=True)
    # Buffer positions, first choices of all tokens before second choices.
    choice_mask = jax.nn.one_hot(choice, e).transpose((0, 2, 1, 3))  # [B, k, T, E]
    choice_mask = choice_mask.reshape((b, k * t, e))  # [B, kT, E] priority order
    position = jnp.cumsum(choice_mask, axis=1) - 1.0  # [B, kT, E]
    kept = choice_mask * (position < c)  # [B, kT, E]
    overflowed = (choice_mask - kept).sum(-1).reshape((b, k, t))  # [B, k, T]
    slot = jax.nn.one_hot(position.astype(jnp.int32), c) * kept[..., None]  # [B, kT, E, C]
    slot = slot.reshape((b, k, t, e, c))
    dispatch = slot.sum(axis=1)  # [B, T, E, C]; top-k experts are distinct
    gates_kt = gates.transpose((0, 2, 1))  # [B, k, T]
    combine = jnp.einsum('bkt,bktec->btec', gates_kt, slot)  # [B, T, E, C]
    expert_inputs = jnp.einsum('btec,btd->becd', dispatch, tokens)  # [B, E, C, d]
    expert_outputs, hidden = Experts(e, self.expert_hidden_units, name='experts')(
        expert_inputs, expert_mask, noisy=noisy,
        deterministic=deterministic)  # [B, E, C, d]
    outputs = jnp.einsum('btec,becd->btd', combine, expert_outputs)  # [B, T, d]
    if self.overflow == 'pass_through':
      passed = jnp.einsum('bkt,bkt->bt', gates_kt, overflowed)  # [B, T]
      outputs = outputs + passed[..., None] * tokens
    losses = {
        'importance_loss': importance_loss(probs),
        'load_loss': load_loss(probs, choice[..., 0]),
        'z_loss': z_loss(logits),
    }
    diagnostics = dict(
        losses,
        router_probs=probs,
        dispatch_mask=dispatch,
        combine_weights=combine,
        expert_hidden=hidden,
        dropped_fraction=overflowed.sum() / (b * k * t),
        aux_loss=(self.importance_loss_weight * losses['importance_loss'] +
                  self.load_loss_weight * losses['load_loss'] +
                  self.z_loss_weight * losses['z_loss']),
    )
    return outputs, diagnostics
