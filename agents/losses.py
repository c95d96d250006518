"""TD losses and the C51 projection, as pure functions of arrays.

Shapes are per batch: `[B]` for scalars per transition, `[B, N]` over atoms.
"""

import jax
import jax.numpy as jnp


def mse_loss(td_error):
  """Dopamine's JAX default (`dopamine.jax.losses.mse_loss`): td^2, no 1/2."""
  return td_error ** 2


def huber_loss(td_error, delta: float = 1.0):
  abs_td = jnp.abs(td_error)
  quadratic = jnp.minimum(abs_td, delta)
  return 0.5 * quadratic ** 2 + delta * (abs_td - quadratic)


LOSSES = {'mse': mse_loss, 'huber': huber_loss}


def categorical_projection(target_support, target_probs, support):
  """Projects a distribution on `target_support` onto the fixed `support`.

  Bellemare et al. (2017), Algorithm 1: each target atom z_j with mass p_j is
  clipped to [v_min, v_max] and split between its two neighbouring atoms of
  `support` in proportion to proximity, so total mass is conserved.

  Args:
    target_support: [B, N] atom values r + discount * z (any real values).
    target_probs: [B, N] probabilities of those atoms.
    support: [M] evenly spaced atoms from v_min to v_max.
  Returns:
    [B, M] projected probabilities.
  """
  v_min, v_max = support[0], support[-1]
  delta_z = (v_max - v_min) / (support.shape[0] - 1)
  clipped = jnp.clip(target_support, v_min, v_max)  # [B, N]
  # Weight of target atom j on support atom i: max(0, 1 - |z_j - z_i| / dz).
  distance = jnp.abs(clipped[:, None, :] - support[None, :, None])  # [B, M, N]
  weights = jnp.clip(1.0 - distance / delta_z, 0.0, 1.0)  # [B, M, N]
  return jnp.einsum('bmn,bn->bm', weights, target_probs)  # [B, M]


def softmax_cross_entropy(target_probs, logits):
  """-sum_i target_i log softmax(logits)_i, per row: [B, N] -> [B]."""
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)
