"""Tokenizers: feature maps [batch, H, W, C] -> tokens [batch, tokens, dim].

Tokens never mix observations: every op here acts on one sample at a time.
- `per_conv`: one token per spatial position (H*W tokens of C dims); the MoE
  paper's best choice and the default. Flattening these tokens gives exactly
  the row-major flatten of the map, so the dense baseline uses it too.
- `per_feat`: one token per feature map (C tokens of H*W dims).
- `per_patch`: a learned strided conv embedding of non-overlapping patches.
"""

from typing import Tuple

import flax.linen as nn
import gin

from networks.checks import is_int
from networks.encoders import XAVIER


def _is_positive_int(value) -> bool:
  return is_int(value) and value >= 1


def _feature_map_shape(name: str, x) -> Tuple[int, int, int, int]:
  """x.shape as (B, H, W, C); ValueError naming `name` unless a non-empty map."""
  if x.ndim != 4 or 0 in x.shape[1:]:
    raise ValueError(f'{name} needs a non-empty feature map [batch, H, W, C], '
                     f'got shape {tuple(x.shape)}; check the encoder settings.')
  return x.shape


class PerConv(nn.Module):

  @nn.compact
  def __call__(self, x):
    b, h, w, c = _feature_map_shape('PerConv', x)
    return x.reshape((b, h * w, c))  # [B, H*W, C]


class PerFeat(nn.Module):

  @nn.compact
  def __call__(self, x):
    b, h, w, c = _feature_map_shape('PerFeat', x)
    return x.reshape((b, h * w, c)).transpose((0, 2, 1))  # [B, C, H*W]


@gin.configurable
class PerPatch(nn.Module):
  """Patches of `patch_size` embedded by a conv with stride = patch (VALID).

  Only whole patches are embedded: a feature map smaller than one patch in
  either dimension has no tokens and is rejected when the network is traced.
  """
  patch_size: Tuple[int, int] = (3, 3)
  embedding_dim: int = 64

  def __post_init__(self):
    patch = self.patch_size
    if not (isinstance(patch, (tuple, list)) and len(patch) == 2
            and all(map(_is_positive_int, patch))):
      raise ValueError(f'PerPatch.patch_size={patch!r} must be two ints >= 1 '
                       '(patch height, patch width).')
    if not _is_positive_int(self.embedding_dim):
      raise ValueError(f'PerPatch.embedding_dim={self.embedding_dim!r} must be '
                       'an int >= 1.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    _, h, w, _ = _feature_map_shape('PerPatch', x)
    patch_h, patch_w = self.patch_size
    if patch_h > h or patch_w > w:
      raise ValueError(
          f'PerPatch.patch_size={tuple(self.patch_size)} is larger than the '
          f'feature map ({h}x{w} of shape {tuple(x.shape)}), so there would be '
          f'no patch tokens; use a patch_size of at most ({h}, {w}).')
    x = nn.Conv(self.embedding_dim, tuple(self.patch_size),
                strides=tuple(self.patch_size), padding='VALID',
                kernel_init=XAVIER)(x)  # [B, h, w, embedding_dim]
    b, h, w, c = x.shape
    return x.reshape((b, h * w, c))  # [B, h*w, embedding_dim]


TOKENIZERS = {
    'per_conv': PerConv,
    'per_feat': PerFeat,
    'per_patch': PerPatch,
}
