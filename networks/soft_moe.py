"""Soft MoE (Puigcerver et al., ICLR 2024) as the penultimate layer.

For the tokens X [m, d] of ONE observation and phi [d, experts, slots]:
  logits = X phi                              [m, experts, slots]
  D = softmax(logits over tokens)             dispatch: each slot a convex mix of tokens
  C = softmax(logits over all (expert, slot)) combine: each token a convex mix of slots
  slot inputs  X~ = D^T X                     [experts, slots, d]
  slot outputs Y~_{e,s} = expert_e(X~_{e,s})
  Y = C Y~                                    [m, d]
With `normalization` (vmoe), the logits use l2-normalised tokens and
`scale * l2-normalise(phi over d)` with one learned scalar `scale`; the slots
still mix the raw tokens. Slots per expert: `slots_per_expert` when given,
otherwise ceil(capacity_factor * tokens / experts) (Dopamine's rounding: 121
tokens and 8 experts give 16 slots each).
"""

import math
from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from networks.checks import is_int
from networks.experts import Experts, check_expert_args


def _l2_normalize(x, axis, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


@gin.configurable
class SoftMoE(nn.Module):
  num_experts: int = 8
  expert_hidden_units: int = 512
  capacity_factor: float = 1.0
  slots_per_expert: Optional[int] = None
  normalization: bool = False

  def __post_init__(self):
    check_expert_args('SoftMoE', self.num_experts, self.expert_hidden_units,
                      self.capacity_factor)
    if self.slots_per_expert is not None and not (
        is_int(self.slots_per_expert) and self.slots_per_expert >= 1):
      raise ValueError(f'SoftMoE.slots_per_expert={self.slots_per_expert} is '
                       'out of range: use an integer >= 1, or None to derive '
                       'it from capacity_factor.')
    super().__post_init__()

  def num_slots(self, num_tokens: int) -> int:
    """Slots per expert for `num_tokens` input tokens."""
    if self.slots_per_expert is not None:
      return self.slots_per_expert
    return math.ceil(self.capacity_factor * num_tokens / self.num_experts)

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True, expert_mask=None,
               noisy: bool = False):
    _, num_tokens, dim = tokens.shape  # [B, T, d]
    e, s = self.num_experts, self.num_slots(num_tokens)
    # Dopamine's init: lecun_normal over (d, E, S), i.e. fan-in E * d.
    phi = self.param('phi', nn.initializers.lecun_normal(), (dim, e, s))  # [d, E, S]
    flat_phi = phi.reshape((dim, e * s))  # [d, E*S]
    if self.normalization:
      scale = self.param('scale', nn.initializers.ones, ())
      logits = _l2_normalize(tokens, -1) @ (scale * _l2_normalize(flat_phi, 0))
    else:
      logits = tokens @ flat_phi  # [B, T, E*S]
    dispatch = jax.nn.softmax(logits, axis=1)  # [B, T, E*S], sums to 1 over T
    combine = jax.nn.softmax(logits, axis=-1)  # [B, T, E*S], sums to 1 over slots
    slot_inputs = jnp.einsum('btn,btd->bnd', dispatch, tokens)  # [B, E*S, d]
    slot_outputs, hidden = Experts(e, self.expert_hidden_units, name='experts')(
        slot_inputs.reshape((-1, e, s, dim)), expert_mask, noisy=noisy,
        deterministic=deterministic)  # [B, E, S, d]
    outputs = jnp.einsum('btn,bnd->btd', combine,
                         slot_outputs.reshape((-1, e * s, dim)))  # [B, T, d]
    dispatch = dispatch.reshape(dispatch.shape[:2] + (e, s))  # [B, T, E, S]
    combine = combine.reshape(combine.shape[:2] + (e, s))  # [B, T, E, S]
    diagnostics = {
        'dispatch_weights': dispatch,
        'combine_weights': combine,
        'expert_hidden': hidden,
        'aux_loss': jnp.zeros(()),
    }
    return outputs, diagnostics
