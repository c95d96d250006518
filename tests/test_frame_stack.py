"""Frame stacks: the agent's view of the last frames of each env."""

import numpy as np
import pytest

from agents.frame_stack import FrameStacker


def _reference_push(stacks, frames, new_episode):
  """The definition: drop the oldest frame, append the newest; new episodes
  restart from zeros plus their first frame."""
  stacks = np.concatenate([stacks[..., 1:], frames[..., None]], axis=-1)
  stacks[new_episode] = 0
  stacks[new_episode, ..., -1] = frames[new_episode]
  return stacks


@pytest.mark.parametrize('num_envs,shape,stack_size,dtype', [
    (1, (84, 84), 4, np.uint8), (8, (84, 84), 4, np.uint8),
    (3, (5, 7), 2, np.uint8), (4, (4,), 1, np.float32), (2, (4,), 3, np.float32)])
def test_push_matches_the_definition(num_envs, shape, stack_size, dtype):
  rng = np.random.default_rng(0)
  stacker = FrameStacker(num_envs, shape, stack_size, dtype)
  first = (rng.random((num_envs, *shape)) * 255).astype(dtype)
  stacker.reset(first)
  expected = np.zeros((num_envs, *shape, stack_size), dtype)
  expected[..., -1] = first
  for t in range(12):
    frames = (rng.random((num_envs, *shape)) * 255).astype(dtype)
    new_episode = rng.random(num_envs) < 0.2
    stacker.push(frames, new_episode)
    expected = _reference_push(expected, frames, new_episode)
    np.testing.assert_array_equal(stacker._stacks, expected, err_msg=f't={t}')
  # Vector observations with no stacking keep their natural shape.
  if stack_size == 1 and len(shape) == 1:
    assert stacker.observations.shape == (num_envs, *shape)
  else:
    assert stacker.observations.shape == (num_envs, *shape, stack_size)
  np.testing.assert_array_equal(stacker.latest_frames, expected[..., -1])


def test_a_new_episode_never_sees_the_previous_ones_frames():
  stacker = FrameStacker(2, (3,), 4, np.float32)
  stacker.reset(np.ones((2, 3), np.float32))
  for value in (2, 3, 4):
    stacker.push(np.full((2, 3), value, np.float32), np.zeros(2, bool))
  stacker.push(np.full((2, 3), 9, np.float32), np.array([False, True]))
  np.testing.assert_array_equal(stacker._stacks[0, 0], [2, 3, 4, 9])
  np.testing.assert_array_equal(stacker._stacks[1, 0], [0, 0, 0, 9])
