"""Circular replay buffers (uniform and prioritized) that store each frame once.

Storage follows Dopamine's OutOfGraphReplayBuffer, but for `num_envs` parallel environments and
without storing frame stacks: every array is shaped ``[replay_capacity // num_envs, num_envs, ...]``
(one circular region per env, one shared cursor) and preallocated, so 1M 84x84 uint8 frames take
about 7.06 GB. Stacks are rebuilt by index at sample time.

Records. ``add(observation, action, reward, terminal, episode_end)`` takes arrays with a leading
``[num_envs]`` axis and writes, per env, the record of step t: ``(o_t, a_t, r_t, terminal_t,
episode_end_t)`` where r_t and terminal_t result from taking a_t in o_t, and ``episode_end_t`` is
True when the episode ends at t for any reason (terminal or truncation, e.g. the episode cap).
``o_t`` is one frame (``observation_shape``); the state at t is the stack of frames
t-stack_size+1..t of the same env, where frames from before the episode start are zeros (never a
frame of another episode).

Validity of record t (per env), as Dopamine's ``is_valid_transition``, with n = update_horizon:
  * t is stored (written and not overwritten);
  * walking k = 0..n-1 over records t+k (each must be stored): if t+k is terminal, the n-step
    return stops there (discount 0) and t is valid; if t+k ends the episode without a terminal
    (truncation), t is invalid (nothing to bootstrap from); if none of t..t+n-1 ends the episode,
    t is valid when record t+n is stored, bootstrapping from the state at t+n;
  * the stack of t does not need a frame that the cursor has already overwritten. Overwriting
    also loses the episode_end flag of the overwritten record, so a record whose stack reaches
    past the oldest stored one without meeting an episode_end is invalid even if its episode
    in fact started there (conservative, as Dopamine's cursor rule).
Only valid records are sampled (candidates are drawn, then invalid ones rejected and redrawn).

Samples (``sample``) are dicts of numpy arrays with DQN-Zoo time-step names:
  obs_tm1     [B, *observation_shape, stack_size]  state at t (stack on the last axis); for vector
              observations (1-D observation_shape) with stack_size 1: [B, *observation_shape].
              With ``stack_axis_first=True``: [B, stack_size, *observation_shape], the layout the
              frames are stored in, which skips a strided host copy (0.9 -> 0.3 ms for 32 Atari
              transitions); the agent moves the axis last on the device, where it is free.
  a_tm1       [B] int32    a_t.
  r_t         [B] float32  sum_{k<m} gamma^k r_{t+k}, m <= n the steps until a terminal (or n).
  discount_t  [B] float32  gamma^n, or 0 when a terminal occurred inside the window.
  obs_t       like obs_tm1: state at t+n (arbitrary but well-formed when discount_t is 0).
  indices     [B] int64    flat ids (slot * num_envs + env), accepted by update_priorities.
  sampling_probabilities [B] float32  (prioritized only) priority / total priority.
Rewards are stored as given: the runner clips them for learning (``Runner.clip_rewards``).

``PrioritizedReplayBuffer`` keeps one SumTree leaf per flat id. New records get the largest
priority recorded so far (1.0 initially); ``sample`` draws stratified proportionally to priority
and redraws invalid picks, so valid records are sampled in proportion to their priorities.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from agents import sum_tree as sum_tree_lib
from networks.checks import is_int

_FORMAT_VERSION = 1
_MAX_SAMPLE_ATTEMPTS = 1000


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


class ReplayBuffer:
  """Uniform circular replay over `num_envs` envs; see the module docstring.

  Not thread-safe: sample() gathers frames into a scratch buffer owned by the instance (the
  arrays it returns are fresh and owned by the caller).
  """

  def __init__(
      self,
      *,
      observation_shape: tuple,
      stack_size: int,
      replay_capacity: int,
      batch_size: int,
      update_horizon: int = 1,
      gamma: float = 0.99,
      num_envs: int = 1,
      observation_dtype=np.uint8,
      seed: int = 0,
      stack_axis_first: bool = False,
  ):
    _require(
        isinstance(observation_shape, (tuple, list))
        and all(is_int(d) and d >= 1 for d in observation_shape),
        f'observation_shape must be a tuple of integers >= 1, got {observation_shape!r}.')
    _require(is_int(stack_size) and stack_size >= 1,
             f'stack_size must be an integer >= 1, got {stack_size!r}.')
    _require(is_int(num_envs) and num_envs >= 1,
             f'num_envs must be an integer >= 1, got {num_envs!r}.')
    _require(is_int(update_horizon) and update_horizon >= 1,
             f'update_horizon must be an integer >= 1, got {update_horizon!r}.')
    _require(is_int(batch_size) and batch_size >= 1,
             f'batch_size must be an integer >= 1, got {batch_size!r}.')
    min_capacity = num_envs * (stack_size + update_horizon + 1)
    _require(
        is_int(replay_capacity) and replay_capacity >= min_capacity,
        f'replay_capacity must be an integer >= num_envs * (stack_size + update_horizon + 1) = '
        f'{min_capacity}, got {replay_capacity!r}.')
    _require(
        replay_capacity % num_envs == 0,
        f'replay_capacity ({replay_capacity}) must be a multiple of num_envs ({num_envs}).')
    _require(isinstance(gamma, (int, float, np.floating)) and 0.0 <= gamma <= 1.0,
             f'gamma must be a float in [0, 1], got {gamma!r}.')
    try:
      dtype = np.dtype(observation_dtype)
    except TypeError as e:
      raise ValueError(f'observation_dtype {observation_dtype!r} is not a numpy dtype.') from e
    _require(dtype.kind in 'biuf',
             f'observation_dtype must be a numeric numpy dtype, got {dtype}.')
    _require(is_int(seed), f'seed must be an integer, got {seed!r}.')

    self._observation_shape = tuple(int(d) for d in observation_shape)
    self._stack_size = int(stack_size)
    self._replay_capacity = int(replay_capacity)
    self._num_envs = int(num_envs)
    self._capacity_per_env = self._replay_capacity // self._num_envs
    self._batch_size = int(batch_size)
    self._update_horizon = int(update_horizon)
    self._gamma = float(gamma)
    self._observation_dtype = dtype
    self._seed = int(seed)
    # Samples carry a stack axis, except vector observations with stack_size 1.
    self.stacked = not (self._stack_size == 1 and len(self._observation_shape) == 1)
    self._stack_axis_first = bool(stack_axis_first)
    self._discounts = (self._gamma ** np.arange(self._update_horizon)).astype(np.float32)

    rows = (self._capacity_per_env, self._num_envs)
    self._store = {
        'observation': np.zeros(rows + self._observation_shape, dtype=dtype),
        'action': np.zeros(rows, dtype=np.int32),
        'reward': np.zeros(rows, dtype=np.float32),
        'terminal': np.zeros(rows, dtype=np.uint8),
        'episode_end': np.zeros(rows, dtype=bool),
    }
    self.add_count = 0  # Number of add() calls; each writes one record per env.
    self._scratch = None  # Reused by _stacked_states; never handed out.
    self._rng = np.random.default_rng(self._seed)
    self._drawn = None  # While sample_ahead draws: every candidate id drawn.

  # ----------------------------------------------------------------------------------------------
  # Sizes.

  @property
  def replay_capacity(self) -> int:
    return self._replay_capacity

  @property
  def num_envs(self) -> int:
    return self._num_envs

  @property
  def batch_size(self) -> int:
    return self._batch_size

  def _size_per_env(self) -> int:
    return min(self.add_count, self._capacity_per_env)

  def __len__(self) -> int:
    """Number of stored records over all envs."""
    return self._size_per_env() * self._num_envs

  def is_empty(self) -> bool:
    return self.add_count == 0

  def is_full(self) -> bool:
    return self.add_count >= self._capacity_per_env

  # ----------------------------------------------------------------------------------------------
  # Writing.

  def add(self, observation, action, reward, terminal, episode_end) -> None:
    """Writes one record per env at the cursor; every argument has a leading [num_envs] axis."""
    e = self._num_envs
    observation = np.asarray(observation)
    _require(observation.shape == (e,) + self._observation_shape,
             f'observation must have shape {(e,) + self._observation_shape}, '
             f'got {observation.shape}.')
    fields = {'action': action, 'reward': reward, 'terminal': terminal,
              'episode_end': episode_end}
    for name, value in fields.items():
      value = np.asarray(value)
      _require(value.shape == (e,), f'{name} must have shape ({e},), got {value.shape}.')
      fields[name] = value
    terminal = fields['terminal'].astype(bool)
    cursor = self.cursor()
    self._store['observation'][cursor] = observation
    self._store['action'][cursor] = fields['action']
    self._store['reward'][cursor] = fields['reward']
    self._store['terminal'][cursor] = terminal
    # A terminal always ends the episode.
    self._store['episode_end'][cursor] = fields['episode_end'].astype(bool) | terminal
    self.add_count += 1
    self._on_add(cursor)

  def _on_add(self, cursor: int) -> None:
    """Hook for subclasses, called after the records at slot `cursor` were written."""

  def cursor(self) -> int:
    """Slot that the next add() writes."""
    return self.add_count % self._capacity_per_env

  # ----------------------------------------------------------------------------------------------
  # Validity.

  def _split(self, indices: np.ndarray):
    return indices // self._num_envs, indices % self._num_envs

  def _positions(self, slots: np.ndarray) -> np.ndarray:
    """Age rank of each slot: 0 = oldest stored record."""
    oldest = self.cursor() if self.is_full() else 0
    return (slots - oldest) % self._capacity_per_env

  def _stack_frames(self, slots, envs, positions):
    """Frame slots [B, S] (oldest first), alive mask [B, S], and 'needs overwritten' [B]."""
    c, s = self._capacity_per_env, self._stack_size
    episode_end = self._store['episode_end']
    offsets = np.arange(s - 1, -1, -1)
    frame_slots = (slots[:, None] - offsets[None, :]) % c
    alive = np.ones(frame_slots.shape, dtype=bool)
    needs_lost = np.zeros(slots.shape, dtype=bool)
    first_step = self.add_count - self._size_per_env()  # Global step of position 0.
    for j in range(1, s):
      col = s - 1 - j
      before_start = positions - j < 0
      # The episode_end flag of an overwritten record belongs to a newer record: ignore it.
      alive[:, col] = alive[:, col + 1] & ~(episode_end[frame_slots[:, col], envs] & ~before_start)
      # Frames of steps < 0 never existed (the first episode starts at step 0); frames of
      # steps >= 0 before position 0 were overwritten by the cursor, and so was the flag that
      # would say whether they belong to the episode: the stack is then unknowable.
      needs_lost |= alive[:, col] & before_start & (first_step + positions - j >= 0)
      alive[:, col] &= ~before_start
    return frame_slots, alive, needs_lost

  def _transitions(self, indices: np.ndarray):
    """Validity, n-step return and 'terminated' for flat ids (vectorised over [B, n])."""
    c, n = self._capacity_per_env, self._update_horizon
    slots, envs = self._split(indices)
    size = self._size_per_env()
    positions = self._positions(slots)
    ks = np.arange(n)
    records = (slots[:, None] + ks) % c  # [B, n] records t..t+n-1.
    stored = positions[:, None] + ks < size  # [B, n]
    # A window stops at its first episode end (terminal or truncation) or unstored record.
    stops = self._store['episode_end'][records, envs[:, None]] | ~stored  # [B, n]
    has_stop = stops.any(axis=1)
    first_stop = np.where(has_stop, stops.argmax(axis=1), n)  # [B]
    rows = np.arange(indices.shape[0])
    stop_k = np.minimum(first_stop, n - 1)
    # Stopping on a stored terminal ends the return (discount 0); on a truncation or a missing
    # record there is nothing to bootstrap from. Without a stop, record t+n must be stored.
    terminated = has_stop & stored[rows, stop_k] & self._store['terminal'][
        records[rows, stop_k], envs].astype(bool)
    valid = np.where(has_stop, terminated, positions + n < size)
    included = ks <= first_stop[:, None]  # [B, n]
    rewards = self._store['reward'][records, envs[:, None]]  # [B, n]
    returns = (rewards * self._discounts * included).sum(axis=1, dtype=np.float32)
    if self.is_full() and np.any(positions < self._stack_size - 1):
      _, _, needs_lost = self._stack_frames(slots, envs, positions)
      valid &= ~needs_lost
    return valid, returns, terminated

  def is_valid(self, indices) -> np.ndarray:
    """Boolean mask: which flat ids can be sampled now."""
    indices = self._check_indices(indices)
    return self._transitions(indices)[0]

  def valid_indices(self) -> np.ndarray:
    """All flat ids that can be sampled now (int64, ascending)."""
    ids = np.arange(self._replay_capacity, dtype=np.int64)
    return ids[self.is_valid(ids)]

  def num_valid(self) -> int:
    return int(self.valid_indices().size)

  def _check_indices(self, indices) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self._replay_capacity):
      raise ValueError(
          f'replay indices must lie in [0, {self._replay_capacity - 1}], got range '
          f'[{indices.min()}, {indices.max()}].')
    return indices

  # ----------------------------------------------------------------------------------------------
  # Sampling.

  def _draw_candidates(self, count: int) -> np.ndarray:
    """Flat ids of stored records, uniformly."""
    size = self._size_per_env()
    oldest = self.cursor() if self.is_full() else 0
    slots = (oldest + self._rng.integers(0, size, count)) % self._capacity_per_env
    envs = self._rng.integers(0, self._num_envs, count)
    return slots * self._num_envs + envs

  def _redraw_candidates(self, count: int) -> np.ndarray:
    return self._draw_candidates(count)

  def _sample_valid_indices(self, batch_size: int):
    """Draws valid flat ids; returns (indices, n-step returns, terminated) for them."""
    if self.is_empty():
      raise ValueError('Cannot sample from an empty replay buffer.')
    indices = self._draw_candidates(batch_size)
    if self._drawn is not None:
      self._drawn.append(indices.copy())
    valid, returns, terminated = self._transitions(indices)
    attempts = 0
    while not valid.all():
      attempts += 1
      if attempts > _MAX_SAMPLE_ATTEMPTS:
        raise RuntimeError(
            f'Found no valid replay record after {_MAX_SAMPLE_ATTEMPTS} attempts; add more '
            f'transitions before sampling (add_count={self.add_count}).')
      invalid = ~valid
      redrawn = self._redraw_candidates(int(invalid.sum()))
      if self._drawn is not None:
        self._drawn.append(redrawn.copy())
      indices[invalid] = redrawn
      valid[invalid], returns[invalid], terminated[invalid] = self._transitions(redrawn)
    return indices, returns, terminated

  def _stacked_states(self, slots, envs, positions) -> np.ndarray:
    """States ending at `slots`: [B, *obs_shape, S], [B, S, *obs_shape] with stack_axis_first
    (or [B, *obs_shape] without a stack, see the module doc)."""
    frame_slots, alive, _ = self._stack_frames(slots, envs, positions)
    rows = frame_slots * self._num_envs + envs[:, None]  # [B, S] rows of `frames`.
    frames = self._store['observation'].reshape(self._replay_capacity, -1)  # View: [rows, P].
    b, s = rows.shape
    if not self.stacked:
      return np.take(frames, rows[:, 0], axis=0).reshape((b,) + self._observation_shape)
    dead_b, dead_j = np.nonzero(~alive)  # Frames from before the episode start.
    if self._stack_axis_first:
      states = np.take(frames, rows.ravel(), axis=0).reshape(b, s, -1)  # [B, S, P], fresh
      states[dead_b, dead_j] = 0
      return states.reshape((b, s) + self._observation_shape)
    # One gather of contiguous frames, position-major [S, B, P], then one strided copy per stack
    # position into [B, P, S]: ~3x faster than transposing [B, S, P] or than np.take into a
    # strided `out` (which np.take buffers). The gather goes into a persistent scratch buffer.
    if self._scratch is None or self._scratch.shape[0] != s * b:
      self._scratch = np.empty((s * b, frames.shape[1]), dtype=frames.dtype)
    gathered = np.take(frames, rows.T.ravel(), axis=0, out=self._scratch, mode='clip')
    gathered = gathered.reshape(s, b, -1)  # [S, B, P]
    gathered[dead_j, dead_b] = 0
    states = np.empty((b, frames.shape[1], s), dtype=frames.dtype)  # [B, P, S]
    for j in range(s):
      states[:, :, j] = gathered[j]
    return states.reshape((b,) + self._observation_shape + (s,))

  def sample(self, batch_size: int | None = None, indices=None) -> dict:
    """A batch of valid transitions (keys in the module docstring).

    With `indices` (flat ids), returns exactly those; they must all be valid.
    """
    if indices is None:
      batch_size = self._batch_size if batch_size is None else batch_size
      _require(is_int(batch_size) and batch_size >= 1,
               f'batch_size must be an integer >= 1, got {batch_size!r}.')
      indices, returns, terminated = self._sample_valid_indices(int(batch_size))
    else:
      indices = self._check_indices(indices).ravel()
      valid, returns, terminated = self._transitions(indices)
      if not np.all(valid):
        raise ValueError(f'replay indices {indices[~valid].tolist()} are not valid transitions.')
    slots, envs = self._split(indices)
    positions = self._positions(slots)
    n, b = self._update_horizon, indices.shape[0]
    next_slots = (slots + n) % self._capacity_per_env
    # Both states in one gather: rows [:b] are obs_tm1 (state at t), rows [b:] obs_t (t + n).
    states = self._stacked_states(np.concatenate([slots, next_slots]),
                                  np.concatenate([envs, envs]),
                                  np.concatenate([positions, positions + n]))
    discount = np.where(terminated, np.float32(0), np.float32(self._gamma ** n))
    return {
        'obs_tm1': states[:b],  # [B, *obs_shape, S] (or [B, S, *obs_shape], see above)
        'a_tm1': self._store['action'][slots, envs],  # [B]
        'r_t': returns.astype(np.float32),  # [B]
        'discount_t': discount.astype(np.float32),  # [B]
        'obs_t': states[b:],  # like obs_tm1
        'indices': indices.astype(np.int64),  # [B]
    }

  def sample_ahead(self, adds: int, num_batches: int = 1) -> list[dict] | None:
    """The `num_batches` batches that `num_batches` calls of sample() will return after `adds`
    more add() calls, drawn now; or None, leaving the buffer as it was.

    Exact, not approximate: the draws take the same random numbers from the same generator
    state and see the sizes and cursor of that later time, so the batches are the arrays
    sample() would return then, on one condition: the adds write none of the rows the draws
    read (every candidate, accepted or rejected, reads rows t-stack_size+1 .. t+update_horizon).
    When some draw would read such a row (a candidate among the newest records, rare once the
    buffer holds thousands), the generator is put back and None is returned, so the later
    sample() calls draw as if this call had never been made. Nothing may sample in between.
    """
    _require(is_int(adds) and adds >= 0, f'adds must be an integer >= 0, got {adds!r}.')
    _require(is_int(num_batches) and num_batches >= 1,
             f'num_batches must be an integer >= 1, got {num_batches!r}.')
    start_state, add_count = self.rng_state, self.add_count
    first_written = self.cursor()  # the adds write rows first_written, first_written + 1, ...
    self.add_count, self._drawn = add_count + adds, []
    try:
      batches = [self.sample() for _ in range(num_batches)]
      drawn = np.concatenate(self._drawn)
    except (ValueError, RuntimeError):  # e.g. nothing valid yet: let sample() tell later
      batches = None
    finally:
      self.add_count, self._drawn = add_count, None
    if batches is not None and adds:
      c = self._capacity_per_env
      reach = self._stack_size + self._update_horizon  # rows read per candidate
      first_read = (drawn // self._num_envs - (self._stack_size - 1)) % c
      # Two circular row ranges [a, a + L) and [b, b + M) meet iff (b - a) % c < L or
      # (a - b) % c < M.
      meets = (((first_written - first_read) % c < reach)
               | ((first_read - first_written) % c < adds))
      if meets.any():
        batches = None
    if batches is None:
      self.rng_state = start_state
    return batches

  @property
  def rng_state(self) -> dict:
    """The sampling generator's state (a dict; setting it restores it)."""
    return self._rng.bit_generator.state

  @rng_state.setter
  def rng_state(self, state: dict) -> None:
    self._rng.bit_generator.state = state

  # ----------------------------------------------------------------------------------------------
  # Invariants and persistence.

  def check_valid(self) -> None:
    """Asserts the internal invariants (cursor, counts, dtypes, shapes)."""
    rows = (self._capacity_per_env, self._num_envs)
    expected = {
        'observation': (rows + self._observation_shape, self._observation_dtype),
        'action': (rows, np.dtype(np.int32)),
        'reward': (rows, np.dtype(np.float32)),
        'terminal': (rows, np.dtype(np.uint8)),
        'episode_end': (rows, np.dtype(bool)),
    }
    assert set(self._store) == set(expected), sorted(self._store)
    for name, (shape, dtype) in expected.items():
      array = self._store[name]
      assert array.shape == shape, (name, array.shape, shape)
      assert array.dtype == dtype, (name, array.dtype, dtype)
    assert is_int(self.add_count) and self.add_count >= 0, self.add_count
    assert 0 <= self.cursor() < self._capacity_per_env
    assert len(self) == min(self.add_count, self._capacity_per_env) * self._num_envs
    assert len(self) <= self._replay_capacity
    assert np.all(self._store['terminal'] <= 1)
    # A terminal record always ends its episode.
    assert np.all(self._store['episode_end'][self._store['terminal'].astype(bool)])
    if not self.is_full():
      unwritten = slice(self.add_count, None)
      assert not np.any(self._store['episode_end'][unwritten]), 'unwritten slot has data'

  def _config(self) -> dict:
    return {
        'class': type(self).__name__,
        'observation_shape': list(self._observation_shape),
        'stack_size': self._stack_size,
        'replay_capacity': self._replay_capacity,
        'update_horizon': self._update_horizon,
        'gamma': self._gamma,
        'num_envs': self._num_envs,
        'observation_dtype': self._observation_dtype.str,
    }

  def state_dict(self) -> dict:
    """All state as numpy arrays (views of the storage, not copies)."""
    state = {f'store/{k}': v for k, v in self._store.items()}
    state['add_count'] = np.int64(self.add_count)
    state['rng_state'] = np.array(json.dumps(self._rng.bit_generator.state))
    state['config'] = np.array(json.dumps(self._config()))
    state['format_version'] = np.int64(_FORMAT_VERSION)
    return state

  def load_state_dict(self, state) -> None:
    """Restores state_dict(); raises ValueError when it does not match this buffer."""
    try:
      version = int(state['format_version'])
      config = json.loads(str(state['config']))
    except (KeyError, ValueError, TypeError) as e:
      raise ValueError(f'replay state is missing or has a malformed header: {e}') from e
    _require(version == _FORMAT_VERSION,
             f'replay state has format version {version}, expected {_FORMAT_VERSION}.')
    _require(config == self._config(),
             f'replay state was saved with config {config}, but this buffer has '
             f'{self._config()}.')
    new = {}
    for name, array in self._store.items():
      key = f'store/{name}'
      _require(key in state, f'replay state lacks {key!r}.')
      value = np.asarray(state[key])
      _require(value.shape == array.shape and value.dtype == array.dtype,
               f'replay state {key!r} has shape {value.shape} and dtype {value.dtype}, '
               f'expected {array.shape} and {array.dtype}.')
      new[name] = value
    add_count = int(state['add_count'])
    _require(add_count >= 0, f'replay state has add_count {add_count}, expected >= 0.')
    rng = np.random.default_rng()
    try:
      rng.bit_generator.state = json.loads(str(state['rng_state']))
    except (KeyError, ValueError, TypeError) as e:
      raise ValueError(f'replay state has a malformed rng state: {e}') from e
    self._load_extra(state)
    for name, value in new.items():
      self._store[name][...] = value
    self.add_count = add_count
    self._rng = rng

  def _load_extra(self, state) -> None:
    """Hook for subclasses: validate and restore extra state (before the storage is written)."""

  def save(self, path: str) -> None:
    """Writes all state to `path` (uncompressed .npz), atomically via `path + '.tmp'`."""
    tmp_path = path + '.tmp'
    with open(tmp_path, 'wb') as f:
      np.savez(f, **self.state_dict())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)

  def load(self, path: str) -> None:
    """Restores a file written by save(); raises ValueError if it is corrupt or mismatched."""
    try:
      with np.load(path, allow_pickle=False) as data:
        state = {k: data[k] for k in data.files}
    except FileNotFoundError:
      raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, io.UnsupportedOperation) \
        as e:
      raise ValueError(f'replay file {path!r} is corrupt or not a replay file: {e}') from e
    self.load_state_dict(state)


class PrioritizedReplayBuffer(ReplayBuffer):
  """Proportional prioritized replay (stratified sum-tree sampling) over ReplayBuffer."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._sum_tree = sum_tree_lib.SumTree(self._replay_capacity)

  @property
  def sum_tree(self) -> sum_tree_lib.SumTree:
    return self._sum_tree

  def _on_add(self, cursor: int) -> None:
    ids = cursor * self._num_envs + np.arange(self._num_envs, dtype=np.int64)
    self._sum_tree.set(ids, np.full(ids.shape, self._sum_tree.max_recorded))

  def _draw_candidates(self, count: int) -> np.ndarray:
    return self._sum_tree.sample(self._rng, count)

  def _redraw_candidates(self, count: int) -> np.ndarray:
    total = self._sum_tree.total()
    return self._sum_tree.find_prefix_sum(self._rng.random(count) * total)

  def _sample_valid_indices(self, batch_size: int) -> np.ndarray:
    if self.is_empty():
      raise ValueError('Cannot sample from an empty replay buffer.')
    if self._sum_tree.total() <= 0.0:
      raise ValueError('Cannot sample: every stored priority is 0.')
    return super()._sample_valid_indices(batch_size)

  def sample(self, batch_size: int | None = None, indices=None) -> dict:
    batch = super().sample(batch_size=batch_size, indices=indices)
    priorities = self._sum_tree.get(batch['indices'])
    batch['sampling_probabilities'] = (priorities / self._sum_tree.total()).astype(np.float32)
    return batch

  def sample_ahead(self, adds: int, num_batches: int = 1) -> None:
    """Always None: a later draw depends on priorities not yet computed (the pending
    gradient steps') and on the tree's total after the adds."""
    return None

  def get_priorities(self, indices) -> np.ndarray:
    return self._sum_tree.get(self._check_indices(indices))

  def update_priorities(self, indices, priorities) -> None:
    """Sets the priorities of flat ids (duplicates: the last one wins)."""
    indices = self._check_indices(indices).ravel()
    priorities = np.asarray(priorities, dtype=np.float64).ravel()
    _require(priorities.shape == indices.shape,
             f'priorities must have shape {indices.shape}, got {priorities.shape}.')
    _require(bool(np.all(np.isfinite(priorities)) and np.all(priorities >= 0)),
             'priorities must be finite and >= 0.')
    self._sum_tree.set(indices, priorities)

  def check_valid(self) -> None:
    super().check_valid()
    self._sum_tree.check_valid()
    if not self.is_full():
      leaves = self._sum_tree.get(np.arange(self.add_count * self._num_envs,
                                            self._replay_capacity))
      assert np.all(leaves == 0.0), 'unwritten record has a priority'

  def state_dict(self) -> dict:
    state = super().state_dict()
    state.update({f'sum_tree/{k}': v for k, v in self._sum_tree.state_dict().items()})
    return state

  def _load_extra(self, state) -> None:
    keys = ('capacity', 'nodes', 'max_recorded')
    missing = [k for k in keys if f'sum_tree/{k}' not in state]
    _require(not missing, f'replay state lacks sum tree entries {missing}.')
    self._sum_tree.load_state_dict({k: state[f'sum_tree/{k}'] for k in keys})
