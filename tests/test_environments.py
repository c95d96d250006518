"""Tests for experiments/environments.py: Atari protocol, same-step autoreset, seeding, names."""

import numpy as np
import pytest

import ale_py
import gymnasium as gym

from experiments import environments as envs
from experiments.environments import (
    ATARI_GAMES,
    StepResult,
    atari_game_name,
    create_atari_environment,
    create_gym_environment,
)

gym.register_envs(ale_py)


def _random_actions(num_actions, shape, seed=0):
    return np.random.default_rng(seed).integers(0, num_actions, shape)


# ------------------------------------------------------------------------------------------
# Protocol faithfulness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_skip,screen_size", [(4, 84), (2, 64)])
def test_atari_frames_byte_identical_to_gymnasium_atari_preprocessing(frame_skip, screen_size):
    pytest.importorskip("cv2")  # gymnasium's AtariPreprocessing resizes with OpenCV
    from gymnasium.wrappers import AtariPreprocessing

    env = create_atari_environment("Breakout", sticky_actions=False, num_envs=1, seed=0,
                                   frame_skip=frame_skip, screen_size=screen_size)
    ref = AtariPreprocessing(
        gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0),
        noop_max=0,
        frame_skip=frame_skip,
        screen_size=screen_size,
        grayscale_obs=True,
        terminal_on_life_loss=False,
        scale_obs=False,
    )
    try:
        assert env.num_actions == ref.action_space.n == 4
        obs = env.reset(seed=0)
        ref_obs, _ = ref.reset(seed=0)
        assert obs.shape == (1, screen_size, screen_size) and obs.dtype == np.uint8
        assert env.observation_shape == (screen_size, screen_size)
        assert env.frame_skip == frame_skip
        np.testing.assert_array_equal(obs[0], ref_obs)
        actions = _random_actions(env.num_actions, 400, seed=0)
        compared = 0
        for t, a in enumerate(actions):
            res = env.step(np.array([a]))
            ref_obs, ref_r, ref_term, ref_trunc, _ = ref.step(int(a))
            assert res.reward[0] == ref_r, t
            assert res.terminated[0] == ref_term, t
            assert res.truncated[0] == ref_trunc, t
            if ref_term or ref_trunc:
                # Same-step autoreset: the old episode's last frame is kept aside.
                np.testing.assert_array_equal(env.final_observation[0], ref_obs, err_msg=f"{t}")
                compared += 1
                break
            np.testing.assert_array_equal(res.observation[0], ref_obs, err_msg=f"step {t}")
            compared += 1
        assert compared >= 100
    finally:
        env.close()
        ref.close()


def test_atari_protocol_settings_passed_explicitly(monkeypatch):
    import ale_py.vector_env

    captured = {}
    real = ale_py.vector_env.AtariVectorEnv

    def spy(*args, **kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(ale_py.vector_env, "AtariVectorEnv", spy)
    env = create_atari_environment("Pong", num_envs=1)
    env.close()
    kw = captured["kwargs"]
    assert captured["args"] == ("pong", 1)
    expected = dict(
        stack_num=1, noop_max=0, reward_clipping=False, use_fire_reset=False,
        episodic_life=False, frameskip=4, maxpool=True, grayscale=True, img_height=84,
        img_width=84, repeat_action_probability=0.25, full_action_space=False,
        autoreset_mode="SameStep",
    )
    for key, value in expected.items():
        assert kw[key] == value, key
    env = create_atari_environment(
        "Pong", sticky_actions=False, terminal_on_life_loss=True, max_steps_per_episode=100
    )
    env.close()
    kw = captured["kwargs"]
    assert kw["repeat_action_probability"] == 0.0
    # A lost life never resets the game: the wrapper reports it in life_lost.
    assert kw["episodic_life"] is False and kw["life_loss_info"] is False
    # The episode cap is counted by the wrapper; ALE's own cap must never fire before it.
    assert kw["max_num_frames_per_episode"] > 4 * 100


def test_full_action_space_and_no_op_starts_are_gin_parameters():
    env = create_atari_environment("Pong", full_action_space=True)
    assert env.num_actions == 18  # the minimal set has 6
    env.close()

    def first_frames(noop_max, seeds=range(5)):
        frames = []
        for seed in seeds:
            env = create_atari_environment("Seaquest", noop_max=noop_max, seed=seed)
            frames.append(env.reset().tobytes())
            env.close()
        return frames

    assert len(set(first_frames(0))) == 1  # the protocol: every game starts alike
    starts = first_frames(30)
    assert len(set(starts)) > 1  # no-op starts vary with the seed ...
    assert starts == first_frames(30)  # ... reproducibly
    # Capped episodes restart with their own no-ops, from the env's generator.
    env = create_atari_environment("Seaquest", noop_max=30, seed=1, max_steps_per_episode=3)
    restarts = [env.reset().tobytes()]
    for _ in range(12):
        step = env.step(np.zeros(1, np.int64))
        if step.truncated[0]:
            restarts.append(step.observation.tobytes())
    env.close()
    assert len(restarts) == 5 and len(set(restarts)) > 1


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(noop_max=-1), "noop_max=-1 must be an integer >= 0"),
    (dict(noop_max=2.5), "noop_max=2.5 must be an integer >= 0"),
    (dict(full_action_space="yes"), "full_action_space='yes' must be True or False"),
])
def test_bad_action_space_or_no_op_settings_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        create_atari_environment("Pong", **kwargs)


def test_atari_rewards_unclipped():
    env = create_atari_environment("SpaceInvaders", sticky_actions=False, seed=0)
    try:
        env.reset()
        rewards = []
        for a in _random_actions(env.num_actions, 300, seed=0):
            res = env.step(np.array([a]))
            assert res.reward.dtype == np.float32
            rewards.append(res.reward[0])
            if res.reward[0] > 1:
                break
        assert max(rewards) > 1.0  # Space Invaders aliens are worth 5-30 points
    finally:
        env.close()


# ------------------------------------------------------------------------------------------
# Same-step autoreset
# ------------------------------------------------------------------------------------------


def test_atari_same_step_autoreset_on_truncation():
    cap = 10
    env = create_atari_environment(
        "Pong", sticky_actions=False, max_steps_per_episode=cap, seed=0
    )
    long_env = create_atari_environment("Pong", sticky_actions=False, seed=0)
    try:
        first = env.reset()
        long_env.reset()
        episode_actions = _random_actions(env.num_actions, cap, seed=1)
        long_frames = [long_env.step(np.array([a])).observation[0].copy()
                       for a in episode_actions]
        for episode in range(3):
            for t, a in enumerate(episode_actions):
                res = env.step(np.array([a]))
                assert isinstance(res, StepResult)
                assert not res.terminated[0]
                if t < cap - 1:
                    assert not res.truncated[0], (episode, t)
                    # Pong without sticky actions is deterministic: each episode replays.
                    np.testing.assert_array_equal(res.observation[0], long_frames[t])
                else:
                    # The cap ends the episode at exactly `cap` agent steps (no lost step), and
                    # the same call already returns the next episode's first frame.
                    assert res.truncated[0], episode
                    np.testing.assert_array_equal(res.observation[0], first[0])
                    np.testing.assert_array_equal(env.final_observation[0], long_frames[t])
    finally:
        env.close()
        long_env.close()


def test_atari_two_envs_shapes_and_per_env_truncation():
    cap = 200  # random Breakout games end on either side of it
    env = create_atari_environment(
        "Breakout", num_envs=2, terminal_on_life_loss=True, max_steps_per_episode=cap, seed=1
    )
    uncapped = create_atari_environment(
        "Breakout", num_envs=2, terminal_on_life_loss=True, max_steps_per_episode=None, seed=1
    )
    try:
        assert env.num_envs == 2 and env.num_actions == 4 and env.name == "breakout"
        assert env.observation_shape == (84, 84) and env.observation_dtype == np.uint8
        obs = env.reset()
        uncapped.reset()
        assert obs.shape == (2, 84, 84) and obs.dtype == np.uint8
        lengths = np.zeros(2, int)
        truncation_steps = [[], []]
        terminations = 0
        for t, a in enumerate(_random_actions(4, (1000, 2), seed=0)):
            res = env.step(a)
            ref = uncapped.step(a)
            for i in range(2):
                # Until its own first truncation an env is untouched by the other's reset.
                if not truncation_steps[i]:
                    assert res.reward[i] == ref.reward[i]
                    # At the truncating step the returned frame is the next episode's first
                    # one; the last frame of the capped episode is kept aside.
                    last = env.final_observation[i] if res.truncated[i] else res.observation[i]
                    np.testing.assert_array_equal(last, ref.observation[i])
            assert res.observation.shape == (2, 84, 84) and res.observation.dtype == np.uint8
            assert res.reward.shape == (2,) and res.reward.dtype == np.float32
            assert res.terminated.shape == (2,) and res.terminated.dtype == np.bool_
            assert res.truncated.shape == (2,) and res.truncated.dtype == np.bool_
            lengths += 1
            for i in range(2):
                if res.truncated[i]:
                    assert lengths[i] == cap and not res.terminated[i]
                    truncation_steps[i].append(t)
                if lengths[i] == cap:
                    assert res.terminated[i] or res.truncated[i]
                terminations += int(res.life_lost[i])
                if res.terminated[i] or res.truncated[i]:
                    lengths[i] = 0  # the cap counts whole games, across lost lives
        assert terminations > 0
        assert truncation_steps[0] and truncation_steps[1]
        assert truncation_steps[0] != truncation_steps[1]  # each env has its own episode clock
        assert not uncapped.step(np.zeros(2, int)).truncated.any()
    finally:
        env.close()
        uncapped.close()


def test_cartpole_same_step_autoreset_matches_manual_reference():
    """Vector env vs. independent gym.make envs reset by hand: no step lost, same obs."""
    num_envs, seed = 3, 11
    env = create_gym_environment("CartPole", "v1", num_envs=num_envs, seed=seed,
                                 max_steps_per_episode=25)
    refs = [gym.make("CartPole-v1", max_episode_steps=25) for _ in range(num_envs)]
    try:
        assert env.observation_shape == (4,) and env.observation_dtype == np.float32
        assert env.num_actions == 2 and env.name == "CartPole-v1"
        obs = env.reset(seed=seed)
        ref_obs = [r.reset(seed=seed + i)[0] for i, r in enumerate(refs)]
        np.testing.assert_array_equal(obs, np.stack(ref_obs).astype(np.float32))
        returns = np.zeros(num_envs)
        ref_returns = np.zeros(num_envs)
        episode_returns, ref_episode_returns = [], []
        n_term = n_trunc = 0
        for a in _random_actions(2, (200, num_envs), seed=3):
            res = env.step(a)
            assert res.observation.dtype == np.float32 and res.reward.dtype == np.float32
            returns += res.reward
            for i, r in enumerate(refs):
                o, rew, term, trunc, _ = r.step(int(a[i]))
                ref_returns[i] += rew
                assert res.terminated[i] == term and res.truncated[i] == (trunc and not term)
                if term or trunc:
                    np.testing.assert_array_equal(env.final_observation[i], o)
                    o, _ = r.reset()
                    ref_episode_returns.append((i, ref_returns[i]))
                    ref_returns[i] = 0
                    episode_returns.append((i, returns[i]))
                    returns[i] = 0
                    n_term += int(term)
                    n_trunc += int(trunc and not term)
                    # The new episode's first observation arrives in the same step.
                    assert np.all(np.abs(res.observation[i]) <= 0.05)
                np.testing.assert_array_equal(res.observation[i], o.astype(np.float32))
        assert n_term > 0 and n_trunc > 0
        assert episode_returns == ref_episode_returns
        # CartPole pays 1 per step: each return is an episode length, capped at 25.
        assert all(1 <= ret <= 25 for _, ret in episode_returns)
    finally:
        env.close()
        for r in refs:
            r.close()


# ------------------------------------------------------------------------------------------
# Seeding
# ------------------------------------------------------------------------------------------


def _rollout(env, seed, actions):
    obs = [env.reset(seed=seed).copy()]
    rewards, ends = [], []
    for a in actions:
        res = env.step(a)
        obs.append(res.observation.copy())
        rewards.append(res.reward.copy())
        ends.append(res.terminated | res.truncated)
    return np.stack(obs), np.stack(rewards), np.stack(ends)


def test_atari_seeding_reproducible_with_sticky_actions_and_autoresets():
    actions = _random_actions(4, (120, 2), seed=5)
    env = create_atari_environment("Breakout", num_envs=2, max_steps_per_episode=30)
    try:
        o1, r1, e1 = _rollout(env, 7, actions)
        o2, r2, e2 = _rollout(env, 7, actions)  # same env object, reseeded
        o3, _, _ = _rollout(env, 8, actions)
    finally:
        env.close()
    env = create_atari_environment("Breakout", num_envs=2, max_steps_per_episode=30)
    try:
        o4, r4, _ = _rollout(env, 7, actions)  # fresh env, same seed
    finally:
        env.close()
    assert e1.any(axis=0).all()  # autoresets happened in both envs
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(o1, o4)
    np.testing.assert_array_equal(r1, r4)
    assert not np.array_equal(o1, o3)  # sticky actions draw from the seeded generator


def test_reset_without_seed_uses_constructor_seed():
    actions = _random_actions(4, (60, 1), seed=2)
    runs = []
    for _ in range(2):
        env = create_atari_environment("Breakout", seed=3)
        try:
            obs = [env.reset()]
            obs += [env.step(a).observation.copy() for a in actions]
            runs.append(np.stack(obs))
        finally:
            env.close()
    np.testing.assert_array_equal(runs[0], runs[1])
    runs = []
    for _ in range(2):
        env = create_gym_environment("CartPole", seed=3, num_envs=2)
        runs.append(env.reset())
        env.close()
    np.testing.assert_array_equal(runs[0], runs[1])


def test_gym_seeding_reproducible():
    actions = _random_actions(2, (150, 2), seed=9)
    env = create_gym_environment("CartPole", num_envs=2)
    try:
        o1, r1, e1 = _rollout(env, 4, actions)
        o2, r2, e2 = _rollout(env, 4, actions)
        o3, _, _ = _rollout(env, 5, actions)
    finally:
        env.close()
    assert e1.any()
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(e1, e2)
    assert not np.array_equal(o1, o3)


# ------------------------------------------------------------------------------------------
# Names and errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Pong", "pong"),
        ("pong", "pong"),
        ("SpaceInvaders", "space_invaders"),
        ("space_invaders", "space_invaders"),
        ("MontezumaRevenge", "montezuma_revenge"),
        ("MsPacman", "ms_pacman"),
        ("KungFuMaster", "kung_fu_master"),
        ("Jamesbond", "jamesbond"),
        ("JamesBond", "jamesbond"),
        ("UpNDown", "up_n_down"),
        ("ALE/Breakout-v5", "breakout"),
    ],
)
def test_atari_game_name_conversion(name, expected):
    assert atari_game_name(name) == expected


def test_atari_games_tuple():
    assert isinstance(ATARI_GAMES, tuple)
    assert len(ATARI_GAMES) >= 57
    for game in ("pong", "breakout", "space_invaders", "montezuma_revenge", "ms_pacman"):
        assert game in ATARI_GAMES
    assert all(g == g.lower() and " " not in g for g in ATARI_GAMES)


@pytest.mark.parametrize("name", ["CartPole", "CartPole-v1", "Acrobot"])
def test_registered_gym_environment_names_pass(name):
    envs.check_gym_environment_name(name)  # no environment is made


@pytest.mark.parametrize("name,hint", [
    ("CartPol", "did you mean 'CartPole'"), ("CartPole-v9", "did you mean 'CartPole'"),
    ("Qwxyz", "no close match"), (3, "no close match")])
def test_unknown_gym_environment_names_are_refused(name, hint):
    with pytest.raises(ValueError) as info:
        envs.check_gym_environment_name(name)
    assert str(info.value).startswith(f"unknown gym environment {name!r}: {hint}")
    if isinstance(name, str):  # the environment itself says the same
        with pytest.raises(ValueError, match=f"unknown gym environment '{name}"):
            create_gym_environment(name)


def test_unknown_atari_game_error_message():
    with pytest.raises(ValueError) as info:
        atari_game_name("Pongg")
    msg = str(info.value)
    assert "\n" not in msg
    assert "'Pongg'" in msg and "did you mean 'pong'" in msg
    assert str(len(ATARI_GAMES)) in msg
    with pytest.raises(ValueError, match="unknown Atari game 'SpaceInvader'.*space_invaders"):
        create_atari_environment("SpaceInvader")
    with pytest.raises(ValueError, match="unknown Atari game 'Qwxyz': no close match"):
        atari_game_name("Qwxyz")


def test_unknown_gym_environment_error_message():
    with pytest.raises(ValueError) as info:
        create_gym_environment("CartPol")
    msg = str(info.value)
    assert "\n" not in msg and "'CartPol-v1'" in msg
    with pytest.raises(ValueError, match="CartPole-v9"):
        create_gym_environment("CartPole", "v9")


def test_bad_actions_rejected():
    env = create_gym_environment("CartPole", num_envs=2)
    try:
        env.reset()
        with pytest.raises(ValueError):
            env.step(np.array([0, 2]))
        with pytest.raises(ValueError):
            env.step(np.array([0]))
        with pytest.raises(ValueError):
            env.step(np.array([0.0, 1.0]))
        assert env.step(np.array([0, 1])).observation.shape == (2, 4)
    finally:
        env.close()


def test_module_exports_protocol():
    env = create_atari_environment("Pong")
    try:
        for attr in ("num_envs", "num_actions", "observation_shape", "observation_dtype", "name"):
            assert hasattr(env, attr)
        assert env.num_actions == 6 and env.name == "pong"
        assert isinstance(env, envs.AtariEnv)
    finally:
        env.close()


def test_atari_capped_resets_are_reproducible_with_sticky_actions():
    """The cap's partial reset is not reseeded (a seeded one costs ~100 ms): the same seed
    and actions still give the same frames across capped episodes."""
    actions = _random_actions(6, 35, seed=3)
    runs = []
    for _ in range(2):
        env = create_atari_environment("Pong", max_steps_per_episode=10, seed=4)
        try:
            env.reset()
            steps = [env.step(np.array([a])) for a in actions]
        finally:
            env.close()
        assert sum(int(s.truncated[0]) for s in steps) == 3
        runs.append(np.stack([s.observation[0] for s in steps]))
    np.testing.assert_array_equal(runs[0], runs[1])


def _breakout_run(terminal_on_life_loss, steps=1500, cap=None):
    env = create_atari_environment(
        "Breakout", sticky_actions=False, terminal_on_life_loss=terminal_on_life_loss,
        max_steps_per_episode=cap, seed=3)
    try:
        env.reset()
        return [env.step(np.array([a])) for a in _random_actions(4, steps, seed=4)]
    finally:
        env.close()


def test_life_loss_is_reported_without_resetting_the_game():
    """Dopamine's terminal_on_life_loss: a lost life is terminal for learning, and the
    game goes on; only the reporting differs from a run without it."""
    plain = _breakout_run(False)
    lossy = _breakout_run(True)
    for a, b in zip(plain, lossy):  # same frames, rewards and game ends
        np.testing.assert_array_equal(a.observation, b.observation)
        assert a.reward[0] == b.reward[0] and a.terminated[0] == b.terminated[0]
        assert not a.life_lost[0]
    games = sum(int(r.terminated[0]) for r in lossy)
    losses = sum(int(r.life_lost[0]) for r in lossy)
    assert games >= 2
    # Breakout has 5 lives: 4 losses per finished game, and a life lost never ends a game.
    assert 4 * games <= losses < 4 * games + 5
    assert not any(r.life_lost[0] and r.terminated[0] for r in lossy)
    ends = [r for r in lossy if r.life_lost[0] or r.terminated[0]]
    assert all(r.terminal[0] and r.agent_episode_ends[0] for r in ends)
    assert not any(r.episode_ends[0] for r in lossy if r.life_lost[0])


def test_episode_cap_counts_whole_games_across_lost_lives():
    cap = 100  # longer than a life, shorter than a game
    results = _breakout_run(True, steps=400, cap=cap)
    length, saw_loss_mid_game = 0, False
    for r in results:
        length += 1
        saw_loss_mid_game |= bool(r.life_lost[0])
        if r.episode_ends[0]:
            assert length == cap and r.truncated[0]
            length = 0
    assert saw_loss_mid_game
