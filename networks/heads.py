"""Value heads: features [batch, F] -> logits [batch, actions, atoms].

One head covers every combination Rainbow needs: plain or dueling, one atom
(expected Q) or a categorical distribution (C51), plain or noisy linear
layers (`networks.noisy`).
"""

import flax.linen as nn

from networks import noisy as noisy_lib
from networks.encoders import XAVIER


class QHead(nn.Module):
  num_actions: int
  num_atoms: int = 1
  dueling: bool = False
  noisy: bool = False

  def _linear(self, features: int, name: str):
    return noisy_lib.dense(features, self.noisy, XAVIER, name=name)

  @nn.compact
  def __call__(self, features, *, deterministic: bool = True):
    b, a, n = features.shape[0], self.num_actions, self.num_atoms
    advantage = self._linear(a * n, 'advantage' if self.dueling else 'q')(
        features, deterministic=deterministic).reshape((b, a, n))
    if not self.dueling:
      return advantage  # [B, A, N]
    value = self._linear(n, 'value')(
        features, deterministic=deterministic).reshape((b, 1, n))
    return value + advantage - advantage.mean(axis=1, keepdims=True)  # [B, A, N]
