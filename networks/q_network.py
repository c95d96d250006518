"""The Q-network: encoder -> tokenizer -> penultimate -> head.

Configured from gin by name (`QNetwork.encoder`, `.tokenizer`, `.penultimate`,
bound on the constructor function `QNetwork`);
each component's own hyperparameters are bound on its class (for example
`SoftMoE.num_experts = 8`). Head options come from the agent that builds the
network (`num_actions`, `num_atoms`, `v_min`, `v_max`, `dueling`, `noisy`).
One forward pass returns Q-values plus everything the agents and the expert
metrics need, so no second pass is ever run.
"""

from typing import Any, Dict, NamedTuple, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from networks.encoders import ENCODERS
from networks.heads import QHead
from networks.penultimate import MOE_PENULTIMATES, PENULTIMATES
from networks.tokenizers import TOKENIZERS


class NetworkOutput(NamedTuple):
  q_values: jax.Array  # [B, A]
  logits: jax.Array  # [B, A, atoms]
  probabilities: jax.Array  # [B, A, atoms]; ones when atoms == 1
  features: jax.Array  # [B, F] penultimate output fed to the head
  diagnostics: Dict[str, Any]  # layer-specific routing / hidden activations
  aux_loss: jax.Array  # [] weighted auxiliary MoE losses, 0 when none


def _choose(registry: dict, kind: str, name: str):
  if name not in registry:
    raise ValueError(f"QNetwork.{kind}='{name}' is unknown: use one of "
                     f"{', '.join(sorted(registry))}.")
  return registry[name]


@gin.configurable
def QNetwork(num_actions: int, *, encoder: str = 'nature_cnn',  # pylint: disable=invalid-name
             tokenizer: str = 'per_conv', penultimate: str = 'dense',
             num_atoms: int = 1, v_min: float = -10.0, v_max: float = 10.0,
             dueling: bool = False, noisy: bool = False) -> 'QNetworkModule':
  """Builds the Q-network module from component names.

  A constructor function named like the class it builds, so that code and gin
  say `QNetwork` alike.

  Each component is constructed here, once, so its gin-bound hyperparameters
  are resolved at build time: the returned network no longer depends on the
  global gin state (later traces, clones and `gin.clear_config()` are safe).
  """
  if num_actions < 1 or num_atoms < 1:
    raise ValueError(f'QNetwork: num_actions={num_actions} and '
                     f'num_atoms={num_atoms} must be >= 1.')
  if num_atoms > 1 and not v_min < v_max:
    raise ValueError(f'QNetwork: v_min={v_min} must be below v_max={v_max}.')
  return QNetworkModule(
      num_actions=num_actions,
      encoder=_choose(ENCODERS, 'encoder', encoder)(parent=None),
      tokenizer=_choose(TOKENIZERS, 'tokenizer', tokenizer)(parent=None),
      penultimate=_choose(PENULTIMATES, 'penultimate', penultimate)(parent=None),
      penultimate_name=penultimate, num_atoms=num_atoms, v_min=v_min,
      v_max=v_max, dueling=dueling, noisy=noisy)


class QNetworkModule(nn.Module):
  """encoder -> tokenizer -> penultimate -> head; build it with `QNetwork`."""
  num_actions: int
  encoder: nn.Module
  tokenizer: nn.Module
  penultimate: nn.Module
  penultimate_name: str = 'dense'
  num_atoms: int = 1
  v_min: float = -10.0
  v_max: float = 10.0
  dueling: bool = False
  noisy: bool = False

  @property
  def is_moe(self) -> bool:
    return self.penultimate_name in MOE_PENULTIMATES

  @property
  def support(self) -> jax.Array:
    """Atom values [atoms]; a single atom at 0 stands for an expected Q."""
    if self.num_atoms == 1:
      return jnp.zeros((1,))
    return jnp.linspace(self.v_min, self.v_max, self.num_atoms)

  def describe(self) -> Dict[str, Any]:
    """What the config built: names, expert count and scaling factor.

    `scale` is the x-axis of scaling curves: `num_experts` for MoE layers,
    `width_scale` for the dense baseline, 1 otherwise.
    """
    num_experts = getattr(self.penultimate, 'num_experts', None)
    scale = num_experts if num_experts is not None else getattr(
        self.penultimate, 'width_scale', 1)
    encoder = next(k for k, v in ENCODERS.items() if isinstance(self.encoder, v))
    tokenizer = next(k for k, v in TOKENIZERS.items()
                     if isinstance(self.tokenizer, v))
    return {'encoder': encoder, 'tokenizer': tokenizer,
            'penultimate': self.penultimate_name, 'num_experts': num_experts,
            'scale': scale}

  @nn.compact
  def __call__(self, observations, *, deterministic: bool = True,
               expert_mask: Optional[jax.Array] = None) -> NetworkOutput:
    """observations [B, ...] -> NetworkOutput.

    `deterministic` turns off noisy-net and router noise (evaluation);
    training calls need an rng stream 'noise' when either is on.
    `expert_mask` [B, experts] scales each expert's output (MoE layers only).
    """
    feature_map = self.encoder(observations)  # [B, H, W, C]
    tokens = self.tokenizer(feature_map)  # [B, T, d]
    kwargs = {}
    if expert_mask is not None:
      if not self.is_moe:
        raise ValueError(f"expert_mask needs an MoE penultimate layer, not "
                         f"'{self.penultimate_name}'.")
      kwargs['expert_mask'] = expert_mask
    features, diagnostics = self.penultimate(
        tokens, deterministic=deterministic, noisy=self.noisy, **kwargs)
    features = features.reshape((features.shape[0], -1))  # [B, F]
    logits = QHead(self.num_actions, self.num_atoms, self.dueling, self.noisy,
                   name='head')(features, deterministic=deterministic)  # [B, A, N]
    if self.num_atoms == 1:
      probabilities = jnp.ones_like(logits)
      q_values = logits[..., 0]
    else:
      probabilities = jax.nn.softmax(logits, axis=-1)
      q_values = jnp.sum(probabilities * self.support, axis=-1)  # [B, A]
    return NetworkOutput(q_values, logits, probabilities, features, diagnostics,
                         diagnostics['aux_loss'])


def count_parameters(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def parameter_table(params) -> Dict[str, int]:
  """Parameter count per top-level module (encoder, tokenizer, ...)."""
  return {name: count_parameters(sub) for name, sub in params.items()}
