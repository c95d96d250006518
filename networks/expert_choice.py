"""Expert-Choice MoE (Zhou et al., NeurIPS 2022): experts choose tokens.

Within ONE observation, router probabilities p [T, E] (softmax over experts);
each expert takes its top-c tokens by p, with capacity
c = min(T, ceil(capacity_factor * T / E)), so every expert processes exactly
c tokens. Token t's output is sum over the experts that took it of
p[t, e] * expert_e(token_t); a token no expert took outputs zeros.
"""

import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from networks.experts import Experts, check_expert_args
from networks.topk_moe import router_probabilities


@gin.configurable
class ExpertChoiceMoE(nn.Module):
  num_experts: int = 8
  expert_hidden_units: int = 512
  capacity_factor: float = 1.0
  router_noise_std: float = 0.0

  def __post_init__(self):
    check_expert_args('ExpertChoiceMoE', self.num_experts,
                      self.expert_hidden_units, self.capacity_factor)
    if self.router_noise_std < 0:
      raise ValueError(f'ExpertChoiceMoE.router_noise_std='
                       f'{self.router_noise_std} must be >= 0.')
    super().__post_init__()

  def capacity(self, num_tokens: int) -> int:
    return min(num_tokens,
               math.ceil(self.capacity_factor * num_tokens / self.num_experts))

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True, expert_mask=None,
               noisy: bool = False):
    b, t, _ = tokens.shape  # [B, T, d]
    e, c = self.num_experts, self.capacity(t)
    _, probs = router_probabilities(self, tokens, e, self.router_noise_std,
                                    deterministic)  # [B, T, E]
    gates, chosen = jax.lax.top_k(probs.transpose((0, 2, 1)), c)  # [B, E, c]
    dispatch = jax.nn.one_hot(chosen, t)  # [B, E, c, T]
    expert_inputs = jnp.einsum('bect,btd->becd', dispatch, tokens)  # [B, E, c, d]
    expert_outputs, hidden = Experts(e, self.expert_hidden_units, name='experts')(
        expert_inputs, expert_mask, noisy=noisy,
        deterministic=deterministic)  # [B, E, c, d]
    outputs = jnp.einsum('bect,bec,becd->btd', dispatch, gates, expert_outputs)
    diagnostics = {
        'router_probs': probs,
        'dispatch_mask': dispatch,
        'gates': gates,
        'expert_hidden': hidden,
        'aux_loss': jnp.zeros(()),
    }
    return outputs, diagnostics  # [B, T, d]
