"""Factorised Gaussian noisy layers (Fortunato et al., 2018), as Dopamine's
`NoisyNetwork`.

A noisy layer computes y = x (w_mu + w_sigma * eps_in eps_out^T) + b_mu +
b_sigma * eps_out, with f(e) = sign(e) sqrt(|e|) applied to standard normal
draws eps_in [fan_in] and eps_out [features], taken once per call from the rng
stream 'noise' and shared across the batch. Initialisation: w_mu, b_mu ~
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); w_sigma = b_sigma = SIGMA0 / sqrt(fan_in)
with Dopamine's SIGMA0 = 0.1 (the paper's factorised value is 0.5). With
`deterministic=True` (evaluation) the layer uses its means only.

Full Rainbow's noise (`QNetwork(noisy=True)`) is in the head and in the
penultimate layer's first dense layer: Dopamine's `FullRainbowNetwork` makes
its 512-unit hidden layer noisy, and the MoE networks make every expert's
first layer noisy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

SIGMA0 = 0.1


def factorised_noise(key, shape):
  x = jax.random.normal(key, shape)
  return jnp.sign(x) * jnp.sqrt(jnp.abs(x))


def mu_init(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape: jax.random.uniform(key, shape, minval=-bound,
                                               maxval=bound)


def sigma_init(fan_in: int):
  return lambda key, shape: jnp.full(shape, SIGMA0 * fan_in ** -0.5)


def noise_term(key, x, w_sigma, b_sigma):
  """x (w_sigma * eps_in eps_out^T) + b_sigma * eps_out, one noise draw.

  w_sigma [*lead, d, h] and b_sigma [*lead, h], where `lead` are stacked
  layers (experts) with independent noise each; x [*lead, M, d] with a lead,
  or [..., d] without.
  """
  lead, (d, h) = w_sigma.shape[:-2], w_sigma.shape[-2:]
  key_in, key_out = jax.random.split(key)
  eps_in = factorised_noise(key_in, lead + (d,))
  eps_out = factorised_noise(key_out, lead + (h,))
  bias = b_sigma * eps_out
  if lead:  # broadcast each layer's noise over its rows M
    eps_in, eps_out, bias = (v[..., None, :] for v in (eps_in, eps_out, bias))
  # (x * eps_in) @ w_sigma * eps_out == x @ (w_sigma * outer(eps_in, eps_out))
  return jnp.matmul(x * eps_in, w_sigma) * eps_out + bias


class NoisyDense(nn.Module):
  """A noisy linear layer (see the module docstring)."""
  features: int

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    fan_in = x.shape[-1]
    w_mu = self.param('kernel_mu', mu_init(fan_in), (fan_in, self.features))
    b_mu = self.param('bias_mu', mu_init(fan_in), (self.features,))
    w_sigma = self.param('kernel_sigma', sigma_init(fan_in),
                         (fan_in, self.features))
    b_sigma = self.param('bias_sigma', sigma_init(fan_in), (self.features,))
    y = x @ w_mu + b_mu
    if deterministic:
      return y
    return y + noise_term(self.make_rng('noise'), x, w_sigma, b_sigma)


def dense(features: int, noisy: bool, kernel_init, name=None):
  """A Dense or NoisyDense layer called as layer(x, deterministic=...)."""
  if noisy:
    return NoisyDense(features, name=name)
  layer = nn.Dense(features, kernel_init=kernel_init, name=name)
  return lambda x, deterministic: layer(x)
