"""Encoders: observations -> feature maps [batch, height, width, channels].

Every encoder returns a spatial feature map so that any tokenizer can follow it.
The MLP encoder for vector observations returns its last hidden layer split into
`num_tokens` equal chunks, presented as a 1 x num_tokens feature map.
"""

from typing import Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from networks.checks import is_int

# Dopamine's JAX networks use Xavier-uniform kernels throughout.
XAVIER = nn.initializers.xavier_uniform()


def _scaled(features: int, multiplier: float) -> int:
  return max(1, int(round(features * multiplier)))


@gin.configurable
class NatureCNN(nn.Module):
  """Mnih et al. (2015): 32x8x8/4, 64x4x4/2, 64x3x3/1 with SAME padding.

  84x84 inputs give an 11x11x64 map (Dopamine's padding). Inputs are uint8
  frames [batch, 84, 84, stack], scaled to [0, 1] here.
  """
  width_multiplier: float = 1.0

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32) / 255.0  # [B, H, W, stack]
    for features, kernel, stride in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
      x = nn.Conv(_scaled(features, self.width_multiplier), (kernel, kernel),
                  (stride, stride), padding='SAME', kernel_init=XAVIER)(x)
      x = nn.relu(x)
    return x  # [B, 11, 11, 64 * width_multiplier]


class _ResidualBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    y = nn.relu(x)
    y = nn.Conv(self.features, (3, 3), kernel_init=XAVIER)(y)
    y = nn.relu(y)
    y = nn.Conv(self.features, (3, 3), kernel_init=XAVIER)(y)
    return x + y


@gin.configurable
class ImpalaCNN(nn.Module):
  """Espeholt et al. (2018) encoder: per stack conv, max-pool /2, 2 residual blocks.

  Channels (16, 32, 32) times `width_multiplier` (Dopamine's `nn_scale`); 84x84
  inputs give an 11x11x32 map.
  """
  width_multiplier: float = 1.0
  stack_sizes: Sequence[int] = (16, 32, 32)
  num_blocks: int = 2

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32) / 255.0  # [B, H, W, stack]
    for stack in self.stack_sizes:
      features = _scaled(stack, self.width_multiplier)
      x = nn.Conv(features, (3, 3), kernel_init=XAVIER)(x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
      for _ in range(self.num_blocks):
        x = _ResidualBlock(features)(x)
    return nn.relu(x)  # [B, 11, 11, 32 * width_multiplier]


@gin.configurable
class MLPEncoder(nn.Module):
  """Dense ReLU layers for vector observations (classic control).

  The last hidden layer (`hidden_units[-1]` units) is split into `num_tokens`
  tokens, returned as a feature map [batch, 1, num_tokens, units / num_tokens].
  """
  hidden_units: Sequence[int] = (512,)
  num_tokens: int = 1

  def __post_init__(self):
    units = self.hidden_units
    if (not isinstance(units, (tuple, list)) or not units
        or not all(is_int(u) and u >= 1 for u in units)):
      raise ValueError(f'MLPEncoder.hidden_units={units!r} must be a non-empty '
                       'tuple of integers >= 1, such as (512,).')
    if self.num_tokens < 1 or self.hidden_units[-1] % self.num_tokens:
      raise ValueError(
          f'MLPEncoder.num_tokens={self.num_tokens} must be >= 1 and divide '
          f'the last hidden layer ({self.hidden_units[-1]} units).')
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32).reshape((x.shape[0], -1))  # [B, obs_dim]
    for units in self.hidden_units:
      x = nn.relu(nn.Dense(units, kernel_init=XAVIER)(x))
    return x.reshape((x.shape[0], 1, self.num_tokens, -1))  # [B, 1, T, D/T]


ENCODERS = {
    'nature_cnn': NatureCNN,
    'impala_cnn': ImpalaCNN,
    'mlp': MLPEncoder,
}
