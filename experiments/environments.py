"""Batched environments for the runner: Atari (ale-py's native vector env) and classic control.

Every environment here is *batched* over ``num_envs`` (1 included), so the runner has one code
path for one env and for many. The protocol (``BatchedEnv``)::

    env.num_envs, env.num_actions, env.observation_shape, env.observation_dtype, env.name,
    env.frame_skip (frames per agent step)
    env.reset(seed=None) -> observations [num_envs, *observation_shape]
    env.step(actions[num_envs]) -> StepResult(observation, reward, terminated, truncated,
                                              life_lost)
    env.close()

``observation_shape`` is the shape of ONE frame: ``(84, 84)`` uint8 for Atari, e.g. ``(4,)``
float32 for CartPole. Environments return single frames; the agent keeps its own frame stack
(the replay buffer stores each frame once).

Same-step autoreset
-------------------
When sub-environment ``i`` ends at a step (``terminated[i] or truncated[i]``), the observation
returned by that same ``step`` call is ALREADY the first observation of its next episode, and the
reward / flags are those of the final transition of the old episode. The caller therefore never
sees a transition that spans two episodes, and no step is spent on a reset that ignores the
action (gymnasium's NEXT_STEP mode, the default of ``AtariVectorEnv``, would do exactly that).
The last observation of the ended episode is kept in ``env.final_observation`` (valid at the rows
that ended in the latest step) for callers that want to bootstrap on truncation; the Dopamine
protocol does not need it.

Atari protocol (Dopamine-compatible, see the README, "Protocol and decisions")
----------------------------------------------------------------------
``create_atari_environment`` drives ``ale_py.vector_env.AtariVectorEnv`` for any ``num_envs``
with every preprocessing option set explicitly, because its defaults differ from the protocol
(30 no-op starts, reward clipping, fire reset, a stack of 4, NEXT_STEP autoreset):

* ALE v5 game, sticky actions ``repeat_action_probability=0.25`` (0.0 with
  ``sticky_actions=False``), minimal action set (gin ``full_action_space=False``);
* ``frameskip=4`` with max-pool over the last two frames, grayscale, 84x84 (area resize; gin
  parameters ``create_atari_environment.frame_skip`` and ``.screen_size``),
  ``stack_num=1`` (the stack axis is squeezed away);
* ``noop_max=0`` (a gin parameter), ``use_fire_reset=False``, ``episodic_life=False``: a lost
  life never resets the game. With ``terminal_on_life_loss=True`` it is reported in
  ``life_lost`` (from the change in ALE's ``lives``), as Dopamine's ``AtariPreprocessing``
  reports it: terminal for learning and the end of the agent's episode (new frame stack),
  while the game, its return and its episode cap go on until game over;
* ``reward_clipping=False``: rewards are the UNCLIPPED game score (clipping to [-1, 1] is done by
  the runner, for learning only, so reported returns are always the true game score);
* ``autoreset_mode='SameStep'`` (supported natively by ale-py 0.12);
* episode cap of ``max_steps_per_episode`` agent steps (27,000 = 108,000 frames by default),
  reported as ``truncated``. The cap is counted here, per sub-environment, and the capped
  sub-environments are reset in the same step (partial reset with ``reset_mask``, without a
  seed: the sub-environment's own generator continues, as after a natural episode end, so runs
  stay reproducible; a seeded partial reset costs about 100 ms in ale-py 0.12, 4 ms without).
  ALE's own ``max_num_frames_per_episode`` is not used for the cap (it is set out of reach)
  because in ale-py 0.12 the observation returned at an ALE truncation is stale: it repeats
  the previous step's frame instead of the frame after the last 4 frames (found while writing
  tests/test_environments.py). ALE's counter and ours both
  restart at every game end (game over or cap), not at a lost life.
  ``truncated`` is only set where ``terminated`` is not: a terminal transition is terminal.

With sticky actions off these frames are byte-identical to gymnasium's
``AtariPreprocessing(noop_max=0, frame_skip=4, screen_size=84, grayscale_obs=True)`` over
``ALE/<Game>-v5`` with ``frameskip=1`` (checked in tests/test_environments.py), without needing
OpenCV, and faster.

Game names: Dopamine's CamelCase (``Pong``, ``SpaceInvaders``, ``MontezumaRevenge``), ale-py's
snake_case (``space_invaders``) and gymnasium ids (``ALE/Pong-v5``) are all accepted and
normalised by ``atari_game_name`` against ``ATARI_GAMES`` (the ROMs shipped in the ale-py wheel).
An unknown game raises ``ValueError`` with one line suggesting close matches.

Seeding
-------
``reset(seed)`` seeds sub-environment ``i`` with ``seed + i``; later automatic resets draw from
the sub-environments' own generators, so the same seed and the same action sequence reproduce the
same observations and rewards (sticky actions included). ``reset()`` without a seed uses the
constructor's ``seed`` on the first call and continues the generators afterwards.

Classic control
---------------
``create_gym_environment`` wraps ``gymnasium.make`` environments (discrete actions only) in
gymnasium's ``SyncVectorEnv`` with SAME_STEP autoreset; observations are cast to float32 and the
TimeLimit truncation is reported as ``truncated``.
"""

from __future__ import annotations

import difflib
import re
from typing import NamedTuple, Protocol

import numpy as np

import ale_py
import ale_py.roms
import gymnasium as gym

from networks.checks import check_flags, is_int

__all__ = [
    "ATARI_GAMES",
    "AtariEnv",
    "BatchedEnv",
    "GymEnv",
    "StepResult",
    "atari_game_name",
    "create_atari_environment",
    "create_gym_environment",
]

# ROMs shipped in the installed ale-py wheel, snake_case (e.g. 'pong', 'space_invaders').
ATARI_GAMES: tuple[str, ...] = tuple(sorted(ale_py.roms.get_all_rom_ids()))
_COMPACT_TO_GAME = {g.replace("_", ""): g for g in ATARI_GAMES}

FRAMES_PER_AGENT_STEP = 4
_NO_CAP_FRAMES = 2**30


class StepResult(NamedTuple):
    """Result of one batched step (see the module docstring for same-step autoreset)."""

    observation: np.ndarray  # [num_envs, *observation_shape]; next episode's first obs if ended
    reward: np.ndarray  # [num_envs] float32, unclipped
    terminated: np.ndarray  # [num_envs] bool: game over
    truncated: np.ndarray  # [num_envs] bool: episode cap
    life_lost: np.ndarray  # [num_envs] bool: a life lost, the game goes on (terminal_on_life_loss)

    @property
    def episode_ends(self) -> np.ndarray:
        """The episode (a whole game) ends here: its return is complete, the env was reset."""
        return self.terminated | self.truncated

    @property
    def agent_episode_ends(self) -> np.ndarray:
        """Dopamine's end_episode / begin_episode: a game's end or a lost life. The agent
        starts a new frame stack and the replay a new episode."""
        return self.terminated | self.truncated | self.life_lost

    @property
    def terminal(self) -> np.ndarray:
        """Terminal for learning (no bootstrap): game over, or a lost life."""
        return self.terminated | self.life_lost


class BatchedEnv(Protocol):
    num_envs: int
    num_actions: int
    observation_shape: tuple
    observation_dtype: np.dtype
    name: str
    frame_skip: int

    def reset(self, seed: int | None = None) -> np.ndarray: ...

    def step(self, actions: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Atari
# --------------------------------------------------------------------------------------------


def camel_to_snake(name: str) -> str:
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return re.sub(r"[\s\-]+", "_", name).lower()


def atari_game_name(name: str) -> str:
    """Normalises an Atari game name to ale-py's snake_case ROM id and validates it.

    Accepts 'Pong', 'SpaceInvaders', 'space_invaders', 'MontezumaRevenge', 'ALE/Pong-v5'.
    Raises ValueError (one line, with close matches) for an unknown game.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"unknown Atari game {name!r}: expected a game name such as 'Pong'")
    stripped = name.strip()
    stripped = re.sub(r"^ALE/", "", stripped)
    stripped = re.sub(r"-v\d+$", "", stripped)
    snake = camel_to_snake(stripped)
    if snake in ATARI_GAMES:
        return snake
    compact = re.sub(r"[_\s\-]", "", stripped).lower()
    if compact in _COMPACT_TO_GAME:  # e.g. 'JamesBond' -> 'jamesbond', 'UpNDown' -> 'up_n_down'
        return _COMPACT_TO_GAME[compact]
    matches = difflib.get_close_matches(snake, ATARI_GAMES, n=3, cutoff=0.6)
    if not matches:
        matches = [
            _COMPACT_TO_GAME[m]
            for m in difflib.get_close_matches(compact, list(_COMPACT_TO_GAME), n=3, cutoff=0.6)
        ]
    hint = (
        "did you mean " + " or ".join(repr(m) for m in matches) + "?"
        if matches
        else "no close match"
    )
    raise ValueError(
        f"unknown Atari game {name!r}: {hint} ({len(ATARI_GAMES)} games available in "
        f"ale-py {ale_py.__version__}, see experiments.environments.ATARI_GAMES)"
    )


def check_gym_environment_name(name: str) -> None:
    """Raises ValueError (one line, with close matches) unless some version of the gym
    environment `name` ('CartPole', or 'CartPole-v1' exactly) is registered. A lookup in
    gymnasium's registry: no environment is made."""
    registered = set(gym.envs.registry)
    if isinstance(name, str) and re.search(r"-v\d+$", name):
        if name in registered:
            return
    elif isinstance(name, str) and any(re.fullmatch(re.escape(name) + r"-v\d+", i)
                                       for i in registered):
        return
    bases = sorted({re.sub(r"-v\d+$", "", i) for i in registered})
    base = re.sub(r"-v\d+$", "", name) if isinstance(name, str) else ""
    matches = difflib.get_close_matches(base, bases, n=3, cutoff=0.6)
    hint = ("did you mean " + " or ".join(repr(m) for m in matches) + "?" if matches
            else "no close match")
    raise ValueError(f"unknown gym environment {name!r}: {hint}")


def _check_actions(actions, num_envs: int, num_actions: int) -> np.ndarray:
    actions = np.asarray(actions)
    if actions.shape != (num_envs,):
        actions = actions.reshape(-1)
        if actions.shape != (num_envs,):
            raise ValueError(f"expected {num_envs} actions, got array of shape {actions.shape}")
    if not np.issubdtype(actions.dtype, np.integer):
        raise ValueError(f"actions must be integers, got dtype {actions.dtype}")
    if num_envs and (actions.min() < 0 or actions.max() >= num_actions):
        raise ValueError(f"actions must lie in [0, {num_actions}), got {actions.tolist()}")
    return actions


class AtariEnv:
    """Batched Atari env over ale-py's native ``AtariVectorEnv`` (protocol in module docstring).

    `frame_skip` and `screen_size` are Dopamine's `AtariPreprocessing` parameters (4 and 84 by
    default): frames per agent step (max-pooled over the last two) and the side of the square
    grayscale observation. Off the protocol, for other papers' settings: `full_action_space`
    (all 18 actions instead of the game's minimal set) and `noop_max` (ale-py's no-op starts:
    after every reset, a random number of up to `noop_max` no-op frames drawn from the
    sub-environment's own seeded generator; 0, the protocol, takes none).
    """

    observation_dtype = np.dtype(np.uint8)

    def __init__(
        self,
        game_name: str = "Pong",
        *,
        sticky_actions: bool = True,
        num_envs: int = 1,
        max_steps_per_episode: int | None = 27000,
        terminal_on_life_loss: bool = False,
        seed: int = 0,
        num_threads: int = 0,
        frame_skip: int = FRAMES_PER_AGENT_STEP,
        screen_size: int = 84,
        full_action_space: bool = False,
        noop_max: int = 0,
    ):
        from ale_py.vector_env import AtariVectorEnv

        game = atari_game_name(game_name)
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if max_steps_per_episode is not None and int(max_steps_per_episode) < 1:
            raise ValueError(
                f"max_steps_per_episode must be >= 1 (or None), got {max_steps_per_episode}"
            )
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {num_threads}")
        for name, value in (("frame_skip", frame_skip), ("screen_size", screen_size)):
            if not is_int(value) or value < 1:
                raise ValueError(
                    f"create_atari_environment.{name}={value!r} must be an integer >= 1"
                )
        if not is_int(noop_max) or noop_max < 0:
            raise ValueError(
                f"create_atari_environment.noop_max={noop_max!r} must be an integer >= 0"
            )
        check_flags("create_atari_environment", sticky_actions=sticky_actions,
                    terminal_on_life_loss=terminal_on_life_loss,
                    full_action_space=full_action_space)
        self.name = game
        self.frame_skip = frame_skip
        self.num_envs = int(num_envs)
        self.sticky_actions = bool(sticky_actions)
        self.max_steps_per_episode = (
            None if max_steps_per_episode is None else int(max_steps_per_episode)
        )
        self.terminal_on_life_loss = bool(terminal_on_life_loss)
        self.seed = int(seed)
        self._env = AtariVectorEnv(
            game,
            self.num_envs,
            batch_size=0,  # synchronous: every step returns all num_envs sub-environments
            num_threads=int(num_threads),
            # The cap is counted in step() (see the module docstring): ALE's is set out of reach.
            max_num_frames_per_episode=_NO_CAP_FRAMES,
            repeat_action_probability=0.25 if self.sticky_actions else 0.0,
            full_action_space=bool(full_action_space),
            continuous=False,
            autoreset_mode="SameStep",
            img_height=screen_size,
            img_width=screen_size,
            grayscale=True,
            stack_num=1,
            frameskip=frame_skip,
            maxpool=True,
            noop_max=int(noop_max),
            episodic_life=False,  # a lost life is reported in life_lost, see step()
            life_loss_info=False,
            reward_clipping=False,
            use_fire_reset=False,
        )
        self.num_actions = int(self._env.single_action_space.n)
        self.observation_shape = (screen_size, screen_size)
        self.final_observation = np.zeros(
            (self.num_envs, *self.observation_shape), self.observation_dtype
        )
        self._episode_steps = np.zeros(self.num_envs, np.int64)
        self._lives = np.zeros(self.num_envs, np.int64)
        self._was_reset = False
        self._closed = False

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is None and not self._was_reset:
            seed = self.seed
        if seed is not None:
            seed = int(seed)
        obs, info = self._env.reset(seed=seed)
        self._episode_steps[:] = 0
        self._lives[:] = info["lives"]
        self._was_reset = True
        return obs[:, 0]

    def step(self, actions: np.ndarray) -> StepResult:
        if not self._was_reset:
            raise RuntimeError("call reset() before step()")
        actions = _check_actions(actions, self.num_envs, self.num_actions).astype(np.int32)
        obs, reward, terminated, truncated, info = self._env.step(actions)
        obs = obs[:, 0]
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool) & ~terminated
        lives = np.asarray(info["lives"], np.int64)  # after an autoreset: the new game's
        if "final_obs" in info:  # ALE ended (and already reset) these sub-environments
            ended = terminated | truncated
            self.final_observation[ended] = np.asarray(info["final_obs"])[ended, 0]
        self._episode_steps += 1
        if self.max_steps_per_episode is not None:
            capped = (self._episode_steps >= self.max_steps_per_episode) & ~(
                terminated | truncated
            )
            if capped.any():
                self.final_observation[capped] = obs[capped]
                new_obs, reset_info = self._env.reset(options={"reset_mask": capped})
                obs = obs.copy()
                obs[capped] = new_obs[capped, 0]
                truncated = truncated | capped
                lives = np.where(capped, reset_info["lives"], lives)
        ended = terminated | truncated
        life_lost = (lives < self._lives) & ~ended & self.terminal_on_life_loss
        self._lives = lives
        self._episode_steps[ended] = 0
        return StepResult(
            observation=obs,
            reward=np.asarray(reward, dtype=np.float32),
            terminated=terminated,
            truncated=truncated,
            life_lost=life_lost,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()

    def __repr__(self) -> str:
        return (
            f"AtariEnv({self.name!r}, num_envs={self.num_envs}, sticky_actions="
            f"{self.sticky_actions}, max_steps_per_episode={self.max_steps_per_episode}, "
            f"terminal_on_life_loss={self.terminal_on_life_loss})"
        )


# Dopamine's factory name, which gin binds (`create_atari_environment.game_name`): the class
# itself, so that its parameters and defaults are written once.
create_atari_environment = AtariEnv


# --------------------------------------------------------------------------------------------
# Classic control (gymnasium.make)
# --------------------------------------------------------------------------------------------


class GymEnv:
    """Batched gymnasium environment (SyncVectorEnv, SAME_STEP autoreset, float32 obs)."""

    observation_dtype = np.dtype(np.float32)
    frame_skip = 1  # one frame per agent step

    def __init__(
        self,
        environment_name: str = "CartPole",
        version: str = "v1",
        *,
        num_envs: int = 1,
        seed: int = 0,
        max_steps_per_episode: int | None = None,
    ):
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        if re.search(r"-v\d+$", environment_name):
            env_id = environment_name
        else:
            env_id = f"{environment_name}-{version}"
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if max_steps_per_episode is not None and int(max_steps_per_episode) < 1:
            raise ValueError(
                f"max_steps_per_episode must be >= 1 (or None), got {max_steps_per_episode}"
            )
        kwargs = {}
        if max_steps_per_episode is not None:
            kwargs["max_episode_steps"] = int(max_steps_per_episode)
        try:
            probe = gym.make(env_id, **kwargs)
        except gym.error.Error as e:
            msg = " ".join(str(e).split())
            raise ValueError(f"unknown gym environment {env_id!r}: {msg}") from None
        if not isinstance(probe.action_space, gym.spaces.Discrete):
            probe.close()
            raise ValueError(
                f"gym environment {env_id!r} has action space {probe.action_space}; "
                "only Discrete action spaces are supported"
            )
        if not isinstance(probe.observation_space, gym.spaces.Box):
            probe.close()
            raise ValueError(
                f"gym environment {env_id!r} has observation space {probe.observation_space}; "
                "only Box observation spaces are supported"
            )
        self.name = env_id
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        self.num_actions = int(probe.action_space.n)
        self.observation_shape = tuple(probe.observation_space.shape)
        self.max_steps_per_episode = (
            max_steps_per_episode
            if max_steps_per_episode is not None
            else (probe.spec.max_episode_steps if probe.spec is not None else None)
        )
        fns = [lambda: gym.make(env_id, **kwargs) for _ in range(self.num_envs - 1)]
        self._env = SyncVectorEnv(
            [lambda: probe, *fns], autoreset_mode=AutoresetMode.SAME_STEP
        )
        self.final_observation = np.zeros(
            (self.num_envs, *self.observation_shape), self.observation_dtype
        )
        self._was_reset = False
        self._closed = False

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is None and not self._was_reset:
            seed = self.seed
        obs, _ = self._env.reset(seed=None if seed is None else int(seed))
        self._was_reset = True
        return np.asarray(obs, dtype=np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        if not self._was_reset:
            raise RuntimeError("call reset() before step()")
        actions = _check_actions(actions, self.num_envs, self.num_actions).astype(np.int64)
        obs, reward, terminated, truncated, info = self._env.step(actions)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool) & ~terminated
        if "final_obs" in info:
            for i in np.flatnonzero(info["_final_obs"]):
                self.final_observation[i] = info["final_obs"][i]
        return StepResult(
            observation=np.asarray(obs, dtype=np.float32),
            reward=np.asarray(reward, dtype=np.float32),
            terminated=terminated,
            truncated=truncated,
            life_lost=np.zeros(self.num_envs, bool),
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()

    def __repr__(self) -> str:
        return f"GymEnv({self.name!r}, num_envs={self.num_envs})"


# Dopamine's factory name for gin (`create_gym_environment.environment_name`), as above.
create_gym_environment = GymEnv
