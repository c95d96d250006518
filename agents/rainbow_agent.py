"""Full Rainbow (Hessel et al., 2018) as in Dopamine's JaxFullRainbowAgent.

Extends `DQNAgent` rather than copying it: the network gets a C51 head
(`num_atoms` on [v_min, v_max]), dueling and noisy layers; the TD loss becomes
the cross-entropy to the projected n-step target distribution; the replay is
prioritized (priority sqrt(loss + 1e-10), importance weights 1/sqrt(p)
normalised by their max); the bootstrap action is chosen by the online
network (double DQN). Each component is a switch. With `noisy`, exploration
comes from the noise alone: epsilon is 0 while training (Dopamine's
`zero_epsilon`) and `epsilon_eval` in evaluation, where the noise is off.
Without `distributional`, the TD loss defaults to Huber (Dopamine's full
Rainbow `mse_loss=False`).

Its parameters, the inherited ones too, are bound as `RainbowAgent.*`. A
`DQNAgent.*` binding would reach a Rainbow agent only for the parameters the
Rainbow config leaves unbound (Dopamine's full Rainbow reads them all from
`JaxDQNAgent.*`), so a Rainbow agent refuses to start while one is bound.
"""

import inspect
from typing import Any, Dict

import gin
import jax
import jax.numpy as jnp

from agents import losses
from agents.dqn_agent import DQNAgent
from networks.checks import check_flags, is_int


def _refuse_dqn_bindings() -> None:
  for name in inspect.signature(DQNAgent.__init__).parameters:
    try:
      gin.query_parameter(f'DQNAgent.{name}')
    except ValueError:  # not bound
      continue
    raise ValueError(f'DQNAgent.{name} is bound, but the agent is a '
                     'RainbowAgent, whose parameters are bound as '
                     f'RainbowAgent.*: write RainbowAgent.{name} instead.')


@gin.configurable
class RainbowAgent(DQNAgent):

  def __init__(self, num_actions, observation_shape, *args,
               num_atoms: int = 51, v_min: float = -10.0, v_max: float = 10.0,
               distributional: bool = True, dueling: bool = True,
               noisy: bool = True, double_dqn: bool = True,
               replay_scheme: str = 'prioritized', update_horizon: int = 3,
               loss_type: str = 'huber', **kwargs):
    _refuse_dqn_bindings()
    check_flags('RainbowAgent', distributional=distributional, dueling=dueling,
                noisy=noisy)
    if distributional and not (is_int(num_atoms) and num_atoms >= 2):
      raise ValueError(f'RainbowAgent.num_atoms={num_atoms!r} must be an '
                       'integer >= 2.')
    if not v_min < v_max:
      raise ValueError(f'RainbowAgent.v_min={v_min!r} must be below '
                       f'v_max={v_max!r}.')
    self.num_atoms = num_atoms if distributional else 1
    self.v_min, self.v_max = v_min, v_max
    self.distributional, self.dueling, self.noisy = distributional, dueling, noisy
    super().__init__(num_actions, observation_shape, *args,
                     double_dqn=double_dqn, replay_scheme=replay_scheme,
                     update_horizon=update_horizon, loss_type=loss_type, **kwargs)

  def _network_kwargs(self) -> Dict[str, Any]:
    return dict(num_atoms=self.num_atoms, v_min=self.v_min, v_max=self.v_max,
                dueling=self.dueling, noisy=self.noisy)

  def epsilon(self) -> float:
    if self.noisy and not self.eval_mode:
      return 0.0
    return super().epsilon()

  def _td_loss(self, loss_fn, out_tm1, target_t, online_t, batch):
    if not self.distributional:
      return super()._td_loss(loss_fn, out_tm1, target_t, online_t, batch)
    return c51_loss(self.network.support, out_tm1, target_t, online_t, batch)


def c51_loss(support, out_tm1, target_t, online_t, batch):
  """Cross-entropy between the projected target and the online distribution."""
  a_tm1 = batch['a_tm1']
  logits_tm1 = jnp.take_along_axis(
      out_tm1.logits, a_tm1[:, None, None], axis=1)[:, 0]  # [B, N]
  chooser = target_t if online_t is None else online_t
  a_t = jnp.argmax(chooser.q_values, axis=-1)  # [B]
  probs_t = jnp.take_along_axis(
      target_t.probabilities, a_t[:, None, None], axis=1)[:, 0]  # [B, N]
  target_support = (batch['r_t'][:, None] +
                    batch['discount_t'][:, None] * support[None, :])  # [B, N]
  target = jax.lax.stop_gradient(
      losses.categorical_projection(target_support, probs_t, support))
  return losses.softmax_cross_entropy(target, logits_tm1)  # [B]
