"""Penultimate layers: tokens [batch, tokens, dim] -> (features, diagnostics).

The layer between the encoder and the head, the one the MoE papers swap. Every
layer takes the tokenizer's output and returns its features ([B, F], or
[B, T, d] tokens that the Q-network flattens into the head) and a dict of
diagnostics from the same forward pass (always including a scalar `aux_loss`).
`noisy=True` (full Rainbow) makes the layer's first dense layer noisy (every
expert's, in MoE layers; see `networks.noisy`).
A new variant is one class plus one line in `PENULTIMATES`.
"""

import flax.linen as nn
import gin
import jax.numpy as jnp

from networks import noisy as noisy_lib
from networks.checks import is_int
from networks.encoders import XAVIER
from networks.expert_choice import ExpertChoiceMoE
from networks.soft_moe import SoftMoE
from networks.topk_moe import TopKMoE


@gin.configurable
class DensePenultimate(nn.Module):
  """The baseline: flatten -> Dense(hidden_units * width_scale) -> ReLU."""
  hidden_units: int = 512
  width_scale: float = 1.0

  def __post_init__(self):
    if not (is_int(self.hidden_units) and self.hidden_units >= 1
            and self.width_scale > 0):
      raise ValueError(
          f'DensePenultimate: hidden_units={self.hidden_units!r} must be an '
          f'integer >= 1 and width_scale={self.width_scale!r} > 0.')
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True, noisy: bool = False):
    x = tokens.reshape((tokens.shape[0], -1))  # [B, T*d]
    units = max(1, int(round(self.hidden_units * self.width_scale)))
    x = nn.relu(noisy_lib.dense(units, noisy, XAVIER)(
        x, deterministic=deterministic))  # [B, units]
    return x, {'hidden': x, 'aux_loss': jnp.zeros(())}


class GlobalAveragePool(nn.Module):
  """Mean over tokens (global average pooling for per_conv tokens); no experts."""

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True, noisy: bool = False):
    del deterministic, noisy  # no parameters
    return tokens.mean(axis=1), {'aux_loss': jnp.zeros(())}  # [B, d]


@gin.configurable
class TokenMLP(nn.Module):
  """Tokenize-then-reduce control without experts (Sokar et al., 2025).

  One MLP, Dense(hidden_units) -> ReLU -> Dense(dim), shared by all tokens (an
  expert without routing), then the tokens are reduced by `reduction`: 'sum',
  'mean', or 'flatten' (into the head, as the MoE layers do).
  """
  hidden_units: int = 512
  reduction: str = 'mean'

  def __post_init__(self):
    if self.reduction not in ('sum', 'mean', 'flatten'):
      raise ValueError(f"TokenMLP.reduction='{self.reduction}' is unknown: use "
                       "one of sum, mean, flatten.")
    if not is_int(self.hidden_units) or self.hidden_units < 1:
      raise ValueError(f'TokenMLP.hidden_units={self.hidden_units!r} must be an '
                       'integer >= 1.')
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True, noisy: bool = False):
    hidden = nn.relu(noisy_lib.dense(self.hidden_units, noisy, XAVIER)(
        tokens, deterministic=deterministic))
    out = nn.Dense(tokens.shape[-1], kernel_init=XAVIER)(hidden)  # [B, T, d]
    if self.reduction == 'sum':
      out = out.sum(axis=1)
    elif self.reduction == 'mean':
      out = out.mean(axis=1)
    return out, {'hidden': hidden, 'aux_loss': jnp.zeros(())}


PENULTIMATES = {
    'dense': DensePenultimate,
    'softmoe': SoftMoE,
    'topk': TopKMoE,
    'expert_choice': ExpertChoiceMoE,
    'gap': GlobalAveragePool,
    'token_mlp': TokenMLP,
}
MOE_PENULTIMATES = ('softmoe', 'topk', 'expert_choice')
