"""Replay buffers against a brute-force Python reference, with check_valid() after every op."""

import os

import numpy as np
import pytest
from scipy import stats

from agents import replay as replay_lib


# --------------------------------------------------------------------------------------------------
# Brute-force reference: the full history of every env, never overwritten.


class History:
  """Every record ever added, per env, indexed by global step."""

  def __init__(self, num_envs):
    self.records = [[] for _ in range(num_envs)]  # (frame, action, reward, terminal, end)

  def add(self, obs, action, reward, terminal, end):
    for e, env_records in enumerate(self.records):
      env_records.append((obs[e].copy(), int(action[e]), float(reward[e]), bool(terminal[e]),
                          bool(end[e]) or bool(terminal[e])))


def reference_stack(records, step, stack_size, oldest_stored):
  """(frames [S, ...] oldest first, needs_overwritten) for the state at `step`."""
  frames = []
  needs_lost = False
  alive = True
  for j in range(stack_size):
    s = step - j
    # The episode_end flag of an overwritten record (s < oldest_stored) is unknown to the buffer.
    if j > 0 and (s < 0 or (s >= oldest_stored and records[s][4])):
      alive = False
    if alive and s < oldest_stored:
      needs_lost = True
    frames.append(records[s][0] if alive and s >= oldest_stored else
                  np.zeros_like(records[step][0]))
  return np.stack(frames[::-1]), needs_lost


def reference_transition(records, step, n, gamma, stack_size, oldest_stored, add_count):
  """None if invalid, else dict(obs_tm1, a_tm1, r_t, discount_t, obs_t or None)."""
  if not oldest_stored <= step < add_count:
    return None
  ret, discount = 0.0, gamma ** n
  for k in range(n):
    if step + k >= add_count:
      return None
    _, _, reward, terminal, end = records[step + k]
    ret += gamma ** k * reward
    if terminal:
      discount = 0.0
      break
    if end:
      return None
  else:
    if step + n >= add_count:
      return None
  obs_tm1, needs_lost = reference_stack(records, step, stack_size, oldest_stored)
  if needs_lost:
    return None
  obs_t = None
  if discount != 0.0:
    obs_t, _ = reference_stack(records, step + n, stack_size, oldest_stored)
  return dict(obs_tm1=obs_tm1, a_tm1=records[step][1], r_t=ret, discount_t=discount, obs_t=obs_t)


def check_against_reference(buffer, history, *, n, gamma, stack_size, capacity_per_env,
                            num_envs):
  add_count = buffer.add_count
  oldest = max(0, add_count - capacity_per_env)
  expected = {}
  for e in range(num_envs):
    for step in range(oldest, add_count):
      ref = reference_transition(history.records[e], step, n, gamma, stack_size, oldest,
                                 add_count)
      if ref is not None:
        expected[(step % capacity_per_env) * num_envs + e] = ref
  valid = buffer.valid_indices()
  assert sorted(expected) == valid.tolist()
  if not expected:
    return 0
  batch = buffer.sample(indices=valid)
  buffer.check_valid()
  for i, flat in enumerate(valid):
    ref = expected[int(flat)]
    np.testing.assert_array_equal(np.moveaxis(batch['obs_tm1'][i], -1, 0), ref['obs_tm1'])
    assert batch['a_tm1'][i] == ref['a_tm1']
    np.testing.assert_allclose(batch['r_t'][i], ref['r_t'], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch['discount_t'][i], ref['discount_t'], rtol=1e-6)
    if ref['obs_t'] is not None:
      np.testing.assert_array_equal(np.moveaxis(batch['obs_t'][i], -1, 0), ref['obs_t'])
  return len(expected)


def random_step(rng, num_envs, shape, p_end=0.15):
  obs = rng.integers(1, 256, (num_envs,) + shape, dtype=np.uint8)  # Never 0: padding is visible.
  action = rng.integers(0, 6, num_envs)
  reward = rng.normal(size=num_envs).astype(np.float32)
  end = rng.random(num_envs) < p_end
  terminal = end & (rng.random(num_envs) < 0.5)  # The other ends are truncations.
  return obs, action, reward, terminal, end


def make(cls=replay_lib.ReplayBuffer, **overrides):
  kwargs = dict(observation_shape=(3, 2), stack_size=4, replay_capacity=40, batch_size=8,
                update_horizon=1, gamma=0.9, num_envs=1, seed=0)
  kwargs.update(overrides)
  return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Semantics against the reference.


@pytest.mark.parametrize('cls', [replay_lib.ReplayBuffer, replay_lib.PrioritizedReplayBuffer])
@pytest.mark.parametrize('n', [1, 3, 10])
@pytest.mark.parametrize('num_envs', [1, 2])
def test_matches_brute_force_reference(cls, n, num_envs):
  """n-step returns, discounts, stacks and validity, through several wrap-arounds."""
  rng = np.random.default_rng(100 * n + num_envs)
  capacity_per_env = 30
  shape = (3, 2)
  buffer = make(cls, update_horizon=n, num_envs=num_envs,
                replay_capacity=capacity_per_env * num_envs)
  history = History(num_envs)
  checked = 0
  for t in range(3 * capacity_per_env + 7):
    step = random_step(rng, num_envs, shape, p_end=0.1)
    buffer.add(*step)
    history.add(*step)
    buffer.check_valid()
    if t % 3 == 0 or t > 2 * capacity_per_env:
      checked += check_against_reference(buffer, history, n=n, gamma=0.9, stack_size=4,
                                         capacity_per_env=capacity_per_env, num_envs=num_envs)
  assert checked > 100


def test_stacks_never_cross_episode_boundaries_two_envs():
  """Interleaved episode ends: zeros before each episode start, per env."""
  buffer = make(observation_shape=(1,), stack_size=4, num_envs=2, replay_capacity=40)
  # Frame value = 10 * env + step; env 0 ends at steps 1 and 5, env 1 at step 3.
  ends = {0: {1, 5}, 1: {3}}
  for step in range(9):
    obs = np.array([[step + 1], [100 + step + 1]], dtype=np.uint8)
    end = np.array([step in ends[0], step in ends[1]])
    buffer.add(obs, np.zeros(2), np.zeros(2), end, end)
    buffer.check_valid()
  def stack(step, env):
    frames = buffer.sample(indices=np.array([step * 2 + env]))['obs_tm1'][0, 0]
    return frames.tolist()
  assert stack(0, 0) == [0, 0, 0, 1]  # Start of the buffer.
  assert stack(2, 0) == [0, 0, 0, 3]  # Episode of env 0 starts at step 2.
  assert stack(4, 0) == [0, 3, 4, 5]
  assert stack(7, 0) == [0, 0, 7, 8]
  assert stack(3, 1) == [101, 102, 103, 104]
  assert stack(5, 1) == [0, 0, 105, 106]
  assert stack(7, 1) == [105, 106, 107, 108]
  batch = buffer.sample(indices=np.array([2 * 0 + 0, 2 * 4 + 1]))
  assert batch['obs_tm1'].shape == (2, 1, 4)
  assert batch['obs_t'][0, 0].tolist() == [0, 0, 1, 2]
  assert batch['obs_t'][1, 0].tolist() == [0, 0, 105, 106]


def test_truncation_inside_window_is_never_sampled():
  buffer = make(observation_shape=(1,), stack_size=1, update_horizon=3, replay_capacity=20)
  # Steps 0..4, truncation (episode_end without terminal) at step 4, then steps 5..9.
  for step in range(10):
    buffer.add(np.array([[step]]), np.zeros(1), np.ones(1), np.zeros(1), np.array([step == 4]))
    buffer.check_valid()
  valid = set(buffer.valid_indices().tolist())
  # 2, 3, 4 would need to bootstrap across the truncation; 7, 8, 9 lack 3 later records.
  assert valid == {0, 1, 5, 6}
  for _ in range(20):
    assert set(buffer.sample(batch_size=16)['indices'].tolist()) <= valid
    buffer.check_valid()


def test_terminal_inside_window_stops_return():
  buffer = make(observation_shape=(1,), stack_size=1, update_horizon=3, gamma=0.5,
                replay_capacity=20)
  rewards = [1.0, 2.0, 4.0, 8.0, 16.0]
  for step, r in enumerate(rewards):
    buffer.add(np.array([[step]]), np.array([step]), np.array([r]), np.array([step == 2]),
               np.array([step == 2]))
  batch = buffer.sample(indices=np.array([0, 1, 2]))
  buffer.check_valid()
  np.testing.assert_allclose(batch['r_t'], [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4])
  np.testing.assert_array_equal(batch['discount_t'], [0, 0, 0])
  np.testing.assert_array_equal(batch['a_tm1'], [0, 1, 2])
  assert batch['obs_tm1'].shape == (3, 1)  # Vector observations, stack 1: no stack axis.
  assert buffer.valid_indices().tolist() == [0, 1, 2]  # 3, 4 need records 5..7.


def test_wrap_around_invalidates_stacks_needing_overwritten_frames():
  capacity = 10
  buffer = make(observation_shape=(1,), stack_size=4, replay_capacity=capacity)
  for step in range(13):  # One long episode: slots 3..9 hold steps 3..9, 0..2 hold 10..12.
    buffer.add(np.array([[step + 1]]), np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1))
    buffer.check_valid()
  assert buffer.is_full() and buffer.cursor() == 3
  # Steps 3, 4, 5 need frames of steps 0..2 (overwritten); step 12 has no next state.
  assert buffer.valid_indices().tolist() == [0, 1, 6, 7, 8, 9]
  batch = buffer.sample(indices=np.array([0, 6]))
  assert batch['obs_tm1'][0, 0].tolist() == [8, 9, 10, 11]
  assert batch['obs_t'][0, 0].tolist() == [9, 10, 11, 12]
  assert batch['obs_tm1'][1, 0].tolist() == [4, 5, 6, 7]
  with pytest.raises(ValueError, match='not valid'):
    buffer.sample(indices=np.array([3]))


def test_shapes_and_dtypes_atari_like():
  buffer = make(replay_capacity=64, observation_shape=(84, 84), stack_size=4, num_envs=2,
                update_horizon=3)
  rng = np.random.default_rng(0)
  for _ in range(20):
    buffer.add(*random_step(rng, 2, (84, 84), p_end=0.05))
  buffer.check_valid()
  batch = buffer.sample()
  buffer.check_valid()
  assert batch['obs_tm1'].shape == (8, 84, 84, 4) and batch['obs_tm1'].dtype == np.uint8
  assert batch['obs_t'].shape == (8, 84, 84, 4) and batch['obs_t'].dtype == np.uint8
  assert batch['a_tm1'].shape == (8,) and batch['a_tm1'].dtype == np.int32
  assert batch['r_t'].dtype == np.float32 and batch['discount_t'].dtype == np.float32
  assert batch['indices'].dtype == np.int64
  assert len(buffer) == 40 and not buffer.is_empty() and buffer.add_count == 20


@pytest.mark.parametrize('cls', [replay_lib.ReplayBuffer, replay_lib.PrioritizedReplayBuffer])
def test_stack_axis_first_is_the_same_stack_moved(cls):
  """Frame-first samples hold the very stacks of the default layout, episode padding included."""
  buffers = [make(cls, replay_capacity=60, num_envs=2, update_horizon=3, stack_axis_first=first)
             for first in (False, True)]
  rng = np.random.default_rng(7)
  for _ in range(70):  # past a wrap-around, with frequent episode ends
    step = random_step(rng, 2, (3, 2), p_end=0.3)
    for buffer in buffers:
      buffer.add(*step)
  last, first = (buffer.sample(batch_size=64) for buffer in buffers)  # same rng, same draws
  np.testing.assert_array_equal(last['indices'], first['indices'])
  assert first['obs_tm1'].shape == (64, 4, 3, 2) and last['obs_tm1'].shape == (64, 3, 2, 4)
  assert (first['obs_tm1'] == 0).any()  # some stacks reach before their episode start
  for key in ('obs_tm1', 'obs_t'):
    np.testing.assert_array_equal(np.moveaxis(first[key], 1, -1), last[key])
  for key in ('a_tm1', 'r_t', 'discount_t'):
    np.testing.assert_array_equal(first[key], last[key])


def test_storage_is_preallocated_once_per_frame():
  buffer = replay_lib.ReplayBuffer(observation_shape=(84, 84), stack_size=4,
                                   replay_capacity=1000, batch_size=32, num_envs=4)
  store = buffer._store  # pylint: disable=protected-access
  assert store['observation'].shape == (250, 4, 84, 84)
  assert store['observation'].nbytes == 1000 * 84 * 84


def test_sampling_empty_or_without_valid_records_raises():
  buffer = make(update_horizon=3)
  with pytest.raises(ValueError, match='empty'):
    buffer.sample()
  buffer.add(np.ones((1, 3, 2)), np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1))
  with pytest.raises(RuntimeError, match='no valid'):
    buffer.sample()


# --------------------------------------------------------------------------------------------------
# Prioritized sampling.


def fill_prioritized(seed=0, capacity=64):
  rng = np.random.default_rng(seed)
  buffer = make(replay_lib.PrioritizedReplayBuffer, observation_shape=(2,), stack_size=1,
                replay_capacity=capacity, batch_size=32, update_horizon=1, seed=seed)
  for _ in range(capacity + 10):
    buffer.add(*random_step(rng, 1, (2,), p_end=0.1))
    buffer.check_valid()
  return buffer


def sample_counts(buffer, draws):
  counts = np.zeros(buffer.replay_capacity)
  for _ in range(draws // buffer.batch_size):
    batch = buffer.sample()
    np.add.at(counts, batch['indices'], 1)
  buffer.check_valid()
  return counts


def test_new_records_get_max_priority():
  buffer = fill_prioritized()
  np.testing.assert_array_equal(buffer.get_priorities(np.arange(64)), np.ones(64))
  buffer.update_priorities(np.array([3, 5]), np.array([2.5, 0.5]))
  buffer.check_valid()
  buffer.add(np.ones((1, 2)), np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1))
  buffer.check_valid()
  assert buffer.get_priorities(np.array([buffer.cursor() - 1]))[0] == 2.5


def test_prioritized_frequencies_follow_priorities_chisquare():
  buffer = fill_prioritized(seed=1)
  rng = np.random.default_rng(2)
  valid = buffer.valid_indices()
  assert 0 < valid.size < buffer.replay_capacity  # Some records are invalid.
  priorities = rng.uniform(0.1, 3.0, buffer.replay_capacity)
  buffer.update_priorities(np.arange(buffer.replay_capacity), priorities)
  buffer.check_valid()
  counts = sample_counts(buffer, 32 * 800)
  assert counts[np.setdiff1d(np.arange(64), valid)].sum() == 0
  expected = priorities[valid] / priorities[valid].sum() * counts.sum()
  assert stats.chisquare(counts[valid], expected).pvalue > 0.001

  batch = buffer.sample()
  np.testing.assert_allclose(batch['sampling_probabilities'],
                             priorities[batch['indices']] / priorities.sum(), rtol=1e-5)
  assert batch['sampling_probabilities'].dtype == np.float32

  # New priorities change the frequencies, and the new ones are followed.
  new = priorities.copy()
  new[valid[:4]] = 50.0
  buffer.update_priorities(valid[:4], new[valid[:4]])
  buffer.check_valid()
  new_counts = sample_counts(buffer, 32 * 800)
  assert new_counts[valid[:4]].sum() > 3 * counts[valid[:4]].sum()
  expected = new[valid] / new[valid].sum() * new_counts.sum()
  assert stats.chisquare(new_counts[valid], expected).pvalue > 0.001


def test_zero_priority_is_never_sampled():
  buffer = fill_prioritized()
  valid = buffer.valid_indices()
  buffer.update_priorities(valid[1:], np.zeros(valid.size - 1))
  buffer.check_valid()
  for _ in range(10):
    assert np.all(buffer.sample()['indices'] == valid[0])
  with pytest.raises(ValueError, match='finite'):
    buffer.update_priorities(np.array([0]), np.array([np.nan]))


# --------------------------------------------------------------------------------------------------
# Persistence.


@pytest.mark.parametrize('n', [1, 3])
@pytest.mark.parametrize('num_envs', [1, 2])
def test_sample_ahead_gives_what_sample_gives_after_the_adds(n, num_envs):
  """Drawn `adds` records ahead, the batches are the arrays sample() returns after those adds,
  through the fill and several wrap-arounds; when a draw would read a row still to be written,
  sample_ahead returns None and leaves the generator as it was. `plain` never draws ahead."""
  rng = np.random.default_rng(10 * n + num_envs)
  capacity_per_env = 30
  kwargs = dict(update_horizon=n, num_envs=num_envs, batch_size=4,
                replay_capacity=capacity_per_env * num_envs)
  ahead, plain = make(**kwargs), make(**kwargs)
  outcomes = {'ahead': 0, 'refused': 0}
  while ahead.add_count < 4 * capacity_per_env:
    adds, count = int(rng.integers(0, 5)), int(rng.integers(1, 3))
    steps = [random_step(rng, num_envs, (3, 2), p_end=0.1) for _ in range(adds)]
    drawn = ahead.sample_ahead(adds, count)
    for step in steps:
      ahead.add(*step)
      plain.add(*step)
    if plain.num_valid() == 0:
      assert drawn is None
      continue
    expected = [plain.sample() for _ in range(count)]
    if drawn is None:  # the generator is untouched: sample() draws as plain's does
      outcomes['refused'] += 1
      drawn = [ahead.sample() for _ in range(count)]
    else:
      outcomes['ahead'] += 1
    assert len(drawn) == count
    for got, want in zip(drawn, expected):
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert ahead.rng_state == plain.rng_state
  # Both paths ran (refusals are common in a buffer this small: 30 rows per env).
  assert min(outcomes.values()) >= 5, outcomes


def test_sample_ahead_refuses_prioritized_and_bad_counts():
  buffer = make(replay_lib.PrioritizedReplayBuffer)
  rng = np.random.default_rng(0)
  for _ in range(20):
    buffer.add(*random_step(rng, 1, (3, 2), p_end=0.0))
  state = buffer.rng_state
  assert buffer.sample_ahead(4) is None  # later priorities decide the draw
  assert buffer.rng_state == state
  with pytest.raises(ValueError, match='adds must be an integer >= 0'):
    make().sample_ahead(-1)
  with pytest.raises(ValueError, match='num_batches must be an integer >= 1'):
    make().sample_ahead(1, 0)


@pytest.mark.parametrize('cls', [replay_lib.ReplayBuffer, replay_lib.PrioritizedReplayBuffer])
def test_save_load_round_trip_gives_identical_samples(cls, tmp_path):
  rng = np.random.default_rng(0)
  kwargs = dict(update_horizon=3, num_envs=2, replay_capacity=40, seed=7)
  buffer = make(cls, **kwargs)
  for _ in range(50):
    buffer.add(*random_step(rng, 2, (3, 2)))
  if cls is replay_lib.PrioritizedReplayBuffer:
    buffer.update_priorities(np.arange(40), rng.uniform(0.1, 2.0, 40))
  buffer.sample()  # Advance the rng: its state must be saved too.
  path = os.path.join(tmp_path, 'replay.npz')
  buffer.save(path)
  assert os.path.exists(path) and not os.path.exists(path + '.tmp')
  restored = make(cls, **{**kwargs, 'seed': 123})
  restored.load(path)
  restored.check_valid()
  assert restored.add_count == buffer.add_count
  for _ in range(3):
    a, b = buffer.sample(), restored.sample()
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_load_rejects_corrupt_and_mismatched_files(tmp_path):
  buffer = make()
  buffer.add(np.ones((1, 3, 2)), np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1))
  path = os.path.join(tmp_path, 'replay.npz')
  buffer.save(path)
  data = open(path, 'rb').read()

  truncated = os.path.join(tmp_path, 'truncated.npz')
  with open(truncated, 'wb') as f:
    f.write(data[: len(data) // 2])
  garbage = os.path.join(tmp_path, 'garbage.npz')
  with open(garbage, 'wb') as f:
    f.write(b'not a replay file at all' * 10)
  for bad in (truncated, garbage):
    fresh = make()
    with pytest.raises(ValueError, match='corrupt'):
      fresh.load(bad)
    fresh.check_valid()
    assert fresh.is_empty()

  with pytest.raises(ValueError, match='config'):
    make(stack_size=2).load(path)
  with pytest.raises(ValueError, match='config'):
    make(replay_lib.PrioritizedReplayBuffer).load(path)

  np.savez(os.path.join(tmp_path, 'other.npz'), x=np.zeros(3))
  with pytest.raises(ValueError, match='header'):
    make().load(os.path.join(tmp_path, 'other.npz'))


# --------------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize('overrides, match', [
    (dict(stack_size=0), 'stack_size'),
    (dict(update_horizon=0), 'update_horizon'),
    (dict(batch_size=0), 'batch_size'),
    (dict(num_envs=0), 'num_envs'),
    (dict(gamma=1.5), 'gamma'),
    (dict(gamma=-0.1), 'gamma'),
    (dict(replay_capacity=5), 'replay_capacity'),
    (dict(replay_capacity=41, num_envs=2), 'multiple of num_envs'),
    (dict(observation_shape=(0, 3)), 'observation_shape'),
    (dict(observation_shape=84), 'observation_shape'),
    (dict(observation_dtype='not-a-dtype'), 'observation_dtype'),
    (dict(observation_dtype=object), 'observation_dtype'),
])
def test_constructor_rejects_bad_values(overrides, match):
  with pytest.raises(ValueError, match=match):
    make(**overrides)
  with pytest.raises(ValueError, match=match):
    make(replay_lib.PrioritizedReplayBuffer, **overrides)


def test_add_rejects_bad_shapes():
  buffer = make(num_envs=2, replay_capacity=40)
  with pytest.raises(ValueError, match='observation'):
    buffer.add(np.ones((1, 3, 2)), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2))
  with pytest.raises(ValueError, match='reward'):
    buffer.add(np.ones((2, 3, 2)), np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2))
  buffer.check_valid()
  assert buffer.is_empty()
