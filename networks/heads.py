"""Value heads: features [batch, F] -> logits [batch, actions, atoms].

One head covers every combination Rainbow needs: plain or dueling, one atom
(expected Q) or a categorical distribution (C51), plain or noisy linear layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from networks.encoders import XAVIER


def _factorised_noise(key, size):
  x = jax.random.normal(key, (size,))
  return jnp.sign(x) * jnp.sqrt(jnp.abs(x))


class NoisyDense(nn.Module):
  """Factorised Gaussian noisy linear layer (Fortunato et al., 2018).

  Noise (rng stream 'noise') is drawn once per call and shared across the
  batch; with `deterministic=True` (evaluation) the layer uses its means only.
  """
  features: int
  sigma0: float = 0.5

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    fan_in = x.shape[-1]
    bound = fan_in ** -0.5
    uniform = lambda k, s: jax.random.uniform(k, s, minval=-bound, maxval=bound)
    sigma = lambda k, s: jnp.full(s, self.sigma0 * bound)
    w_mu = self.param('kernel_mu', uniform, (fan_in, self.features))
    b_mu = self.param('bias_mu', uniform, (self.features,))
    w_sigma = self.param('kernel_sigma', sigma, (fan_in, self.features))
    b_sigma = self.param('bias_sigma', sigma, (self.features,))
    if deterministic:
      return x @ w_mu + b_mu
    key_in, key_out = jax.random.split(self.make_rng('noise'))
    eps_in = _factorised_noise(key_in, fan_in)
    eps_out = _factorised_noise(key_out, self.features)
    # (x * eps_in) @ w_sigma * eps_out == x @ (w_sigma * outer(eps_in, eps_out))
    noise = ((x * eps_in) @ w_sigma) * eps_out
    return x @ w_mu + b_mu + noise + b_sigma * eps_out


class QHead(nn.Module):
  num_actions: int
  num_atoms: int = 1
  dueling: bool = False
  noisy: bool = False

  def _linear(self, features: int, name: str):
    if self.noisy:
      return NoisyDense(features, name=name)
    dense = nn.Dense(features, kernel_init=XAVIER, name=name)
    return lambda x, deterministic: dense(x)

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
