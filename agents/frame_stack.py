"""Per-env frame stacks: the agent's view of the last `stack_size` frames.

Dopamine keeps the stack inside the agent (`_record_observation`); here it is a
small object so that training and evaluation environments each have their own.
A new episode starts from zeros plus its first frame, so stacks never mix
episodes, exactly as the replay buffer rebuilds them.
"""

import numpy as np


class FrameStacker:

  def __init__(self, num_envs: int, observation_shape: tuple, stack_size: int,
               dtype=np.uint8):
    self.stack_size = stack_size
    # Vector observations with no stacking keep their natural shape.
    self._squeeze = stack_size == 1 and len(observation_shape) == 1
    self._stacks = np.zeros((num_envs, *observation_shape, stack_size), dtype)

  @property
  def observations(self) -> np.ndarray:
    """[num_envs, *observation_shape, stack_size] (or [num_envs, *shape])."""
    return self._stacks[..., 0] if self._squeeze else self._stacks

  @property
  def latest_frames(self) -> np.ndarray:
    """The newest frame of every env: [num_envs, *observation_shape]."""
    return self._stacks[..., -1]

  def reset(self, frames: np.ndarray, mask=None) -> None:
    """Starts new episodes (all envs, or those where `mask` is True)."""
    mask = np.ones(len(self._stacks), bool) if mask is None else np.asarray(mask)
    self._stacks[mask] = 0
    self._stacks[mask, ..., -1] = frames[mask]

  def push(self, frames: np.ndarray, new_episode: np.ndarray) -> None:
    """Appends `frames`; envs flagged in `new_episode` restart from zeros."""
    # The stack axis is last and the array C-contiguous, so shifting the
    # flat array back by one element moves every stack back one slot; each
    # stack's last slot gets its neighbour's first element, overwritten just
    # below. One contiguous move: the strided `[..., :-1] = [..., 1:]` costs
    # about 100x more (0.5 ms for 8 Atari stacks).
    flat = self._stacks.reshape(-1)
    flat[:-1] = flat[1:]
    self._stacks[..., -1] = frames
    if np.any(new_episode):
      self.reset(frames, new_episode)
