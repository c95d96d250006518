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

from networks.encoders import XAVIER


class PerConv(nn.Module):

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    return x.reshape((b, h * w, c))  # [B, H*W, C]


class PerFeat(nn.Module):

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    return x.reshape((b, h * w, c)).transpose((0, 2, 1))  # [B, C, H*W]


@gin.configurable
class PerPatch(nn.Module):
  """Patches of `patch_size` embedded by a conv with stride = patch (VALID)."""
  patch_size: Tuple[int, int] = (3, 3)
  embedding_dim: int = 64

  @nn.compact
  def __call__(self, x):
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
