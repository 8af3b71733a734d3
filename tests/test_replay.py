"""ReplayBuffer: transitions, frame stacks, slices, goals, wrap-around, relabelling, save / load,
is_first, episode ids and segments, fixed-offset pairs, action-less (video) steps, the format-1 files.

Synthetic env streams encode (env, episode, step) in every observation (pixels channels, state,
physics), so each check compares what came back with explicit indexing of the ground truth.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import MemoryMappedTensor, TensorDict

from latentrl.replay import ReplayBuffer


class FakeEnvs:
    """``num_envs`` envs whose episode ``i`` of env ``e`` lasts ``lengths[e][i % len(lengths[e])]`` steps.

    Records the ground truth: the rows a frame-once buffer must hold per env, as (episode, step,
    is_transition) with the final observation of each finished episode as its own row, and the order in
    which episodes started (``started``: (env, episode) by step, then env: the buffer's episode ids).
    """

    def __init__(self, lengths, size=4, reward=True, ids=True):
        self.lengths, self.size, self.reward, self.ids = lengths, size, reward, ids
        self.num_envs = len(lengths)
        self.episode = [0] * self.num_envs
        self.t = [0] * self.num_envs
        self.rows = [[] for _ in lengths]
        self.started = []

    def length(self, env, episode):
        return self.lengths[env][episode % len(self.lengths[env])]

    def obs(self, env, episode, t):
        pixels = torch.empty(3, self.size, self.size, dtype=torch.uint8)
        pixels[0], pixels[1], pixels[2] = env, episode, t
        code = [env, episode, t]
        return {"pixels": pixels, "state": torch.tensor(code, dtype=torch.float32),
                "physics": torch.tensor(code, dtype=torch.float64)}

    def step(self) -> TensorDict:
        steps = []
        for env in range(self.num_envs):
            episode, t = self.episode[env], self.t[env]
            done = t + 1 == self.length(env, episode)
            nxt = self.obs(env, episode, t + 1) | {
                "terminated": torch.tensor([False]),
                "truncated": torch.tensor([done]),
                "done": torch.tensor([done]),
            }
            if self.reward:
                nxt["reward"] = torch.tensor([float(t)])
            data = self.obs(env, episode, t) | {
                "action": torch.tensor([env, episode, t], dtype=torch.float32),
                "skill": torch.full((2,), float(episode)),
                "next": nxt,
            }
            if self.ids:
                data |= {"episode": torch.tensor(100 * env + episode), "step": torch.tensor(t)}
            steps.append(TensorDict(data, []))
            self.rows[env].append((episode, t, True))
            if t == 0:
                self.started.append((env, episode))
            if done:
                self.rows[env].append((episode, t + 1, False))
                self.episode[env], self.t[env] = episode + 1, 0
            else:
                self.t[env] = t + 1
        return torch.stack(steps)

    def rollout(self, steps: int) -> TensorDict:
        return torch.stack([self.step() for _ in range(steps)], 1)

    def stored(self, env, per_env):
        """Rows of ``env`` a ring of ``per_env`` rows holds (including the pending next observation)."""
        rows = list(self.rows[env])
        if self.t[env] > 0:
            rows.append((self.episode[env], self.t[env], False))
        return rows[-per_env:]


def decode(pixels: torch.Tensor) -> torch.Tensor:
    """(env, episode, step) of each frame of a stack ``[..., 3k, H, W]`` -> ``[..., k, 3]``."""
    frames = pixels.unflatten(-3, (-1, 3))
    assert (frames == frames[..., :1, :1]).all(), "a frame mixes pixels of different steps"
    return frames[..., 0, 0].long()


def check_batch(batch, envs: FakeEnvs, per_env: int, frame_stack: int, horizon: int):
    """Every sampled element against the ground truth; returns the sampled (env, episode, step) starts."""
    flat = batch.reshape(-1) if horizon > 1 else batch
    code = flat["state"].long()
    stored = {env: set(envs.stored(env, per_env)) for env in range(envs.num_envs)}
    for i, (env, episode, t) in enumerate(code.tolist()):
        assert (episode, t, True) in stored[env], "sampled a transition that is not stored"
        assert (episode, t + 1) in {(e, s) for e, s, _ in stored[env]}
        assert flat["next", "state"][i].tolist() == [env, episode, t + 1]
        assert flat["action"][i].tolist() == [env, episode, t]
        assert flat["skill"][i].tolist() == [episode, episode]
        assert int(flat["episode"][i]) == 100 * env + episode and int(flat["step"][i]) == t
        done = t + 1 == envs.length(env, episode)
        assert bool(flat["next", "done"][i]) == done == bool(flat["next", "truncated"][i])
        assert float(flat["next", "reward"][i]) == t
        expected = [[env, episode, max(t - j, 0)] for j in range(frame_stack - 1, -1, -1)]
        assert decode(flat["pixels"][i]).tolist() == expected
        expected_next = [[env, episode, max(t + 1 - j, 0)] for j in range(frame_stack - 1, -1, -1)]
        assert decode(flat["next", "pixels"][i]).tolist() == expected_next
        for _, _, s in expected:  # the stack read no overwritten frame
            assert (episode, s) in {(e, s) for e, s, _ in stored[env]}
    if horizon > 1:
        code = code.view(len(batch), horizon, 3)
        assert (code[:, :, :2] == code[:, :1, :2]).all(), "a slice crosses an episode"
        assert (code[:, 1:, 2] - code[:, :-1, 2] == 1).all(), "a slice is not contiguous"
        return {tuple(c) for c in code[:, 0].tolist()}
    return {tuple(c) for c in code.tolist()}


def valid_starts(envs: FakeEnvs, per_env: int, frame_stack: int, horizon: int):
    """(env, episode, step) of every sample start whose frames and slice are all stored."""
    out = set()
    for env in range(envs.num_envs):
        stored = envs.stored(env, per_env)
        keys = {(e, s) for e, s, _ in stored}
        transitions = {(e, s) for e, s, is_t in stored if is_t}
        for episode, t, is_t in stored:
            if not is_t:
                continue
            stack_ok = (episode, max(t - frame_stack + 1, 0)) in keys
            slice_ok = all((episode, t + i) in transitions for i in range(horizon))
            if stack_ok and slice_ok:
                out.add((env, episode, t))
    return out


LENGTHS = [[5, 3], [7], [4, 6, 2]]


def assert_same(a: TensorDict, b: TensorDict):
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in a.keys(True, True):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=f"{key} differs")


def test_transitions_and_frame_stacks():
    envs = FakeEnvs(LENGTHS)
    buffer = ReplayBuffer(1000)
    for _ in range(40):
        buffer.extend(envs.step())
    assert len(buffer) == 120
    assert buffer.num_rows == sum(len(envs.stored(e, 1000)) for e in range(3))
    assert buffer.num_episodes == sum(envs.episode) + 3 - sum(t == 0 for t in envs.t)
    for k in (1, 2, 4):
        torch.manual_seed(k)
        batch = buffer.sample(2000, frame_stack=k)
        assert batch.batch_size == (2000,)
        assert batch["pixels"].shape == batch["next", "pixels"].shape == (2000, 3 * k, 4, 4)
        seen = check_batch(batch, envs, 1000, k, 1)
        assert seen == valid_starts(envs, 1000, k, 1)  # every transition comes back, the newest ones too


def test_slices_stay_in_one_episode():
    envs = FakeEnvs(LENGTHS)
    buffer = ReplayBuffer(1000)
    buffer.extend(envs.rollout(40))
    torch.manual_seed(0)
    batch = buffer.sample(1500, frame_stack=3, horizon=4)
    assert batch.batch_size == (1500, 4)
    assert batch["pixels"].shape == (1500, 4, 9, 4, 4) and batch["next", "state"].shape == (1500, 4, 3)
    seen = check_batch(batch, envs, 1000, 3, 4)
    assert seen == valid_starts(envs, 1000, 3, 4)


def test_goals():
    envs = FakeEnvs([[120, 12], [25]])
    buffer = ReplayBuffer(1000)
    buffer.extend(envs.rollout(150))
    torch.manual_seed(0)
    batch = buffer.sample(6000, frame_stack=2, goal="future", future_discount=0.8)
    obs, goal = batch["state"].long(), batch["goal", "state"].long()
    assert (goal[:, :2] == obs[:, :2]).all(), "a future goal left its episode"
    offset = goal[:, 2] - obs[:, 2]
    assert (offset >= 1).all()
    last = {}  # the last stored observation of each episode
    for env in range(envs.num_envs):
        for episode, t, _ in envs.stored(env, 1000):
            last[env, episode] = max(t, last.get((env, episode), 0))
    ends = torch.tensor([last[e, ep] for e, ep in obs[:, :2].tolist()])
    assert (goal[:, 2] <= ends).all()
    assert (goal[:, 2] == ends).any(), "goals never reach a clamped episode end"
    unclamped = offset[obs[:, 2] + 40 < ends].float()
    assert len(unclamped) > 1000
    assert abs(unclamped.mean().item() - 1 / (1 - 0.8)) < 0.5  # geometric with p = 0.2: mean 5, s.e. ~0.13
    goal_pixels = decode(batch["goal", "pixels"])
    assert (goal_pixels[:, -1] == goal).all()
    assert (goal_pixels[:, 0, 2] == (goal[:, 2] - 1).clamp_min(0)).all()
    assert (batch["goal", "step"] == goal[:, 2]).all()

    batch = buffer.sample(3000, goal="random", keys=("state",))
    assert set(batch["goal"].keys()) == {"state", "episode", "step"}
    stored = {(env, e, s) for env in range(2) for e, s, _ in envs.stored(env, 1000)}
    codes = {tuple(c) for c in batch["goal", "state"].long().tolist()}
    assert codes <= stored
    assert len(codes) > 0.9 * len(stored)  # any stored observation, final ones included

    for mode in ("future", "random"):
        sliced = buffer.sample(200, horizon=5, frame_stack=2, goal=mode)
        assert sliced["goal", "state"].shape == (200, 5, 3)
        assert sliced["goal", "pixels"].shape == (200, 5, 6, 4, 4)
        assert (decode(sliced["goal", "pixels"])[..., -1, :] == sliced["goal", "state"].long()).all()
    assert (sliced["goal", "state"][..., 2] > sliced["state"][..., 2]).any()
    sliced = buffer.sample(200, horizon=5, goal="future")
    assert (sliced["goal", "state"][..., :2] == sliced["state"][..., :2]).all()
    assert (sliced["goal", "state"][..., 2] > sliced["state"][..., 2]).all()


def test_wrap_around():
    envs = FakeEnvs([[7, 5], [9], [3, 11]])
    per_env = 16
    buffer = ReplayBuffer(3 * per_env + 2)  # 16 rows per env stream
    for chunk in (1, 5, 1, 1, 12, 3, 20, 1):  # [num_envs] and [num_envs, T] steps, several wraps
        buffer.extend(envs.rollout(chunk) if chunk > 1 else envs.step())
        stored = [envs.stored(e, per_env) for e in range(3)]
        assert len(buffer) == sum(is_t for rows in stored for *_, is_t in rows)
        assert buffer.num_episodes == len({(e, ep) for e, rows in enumerate(stored) for ep, *_ in rows})
    for k, horizon in ((1, 1), (3, 1), (4, 1), (2, 3), (3, 5)):
        torch.manual_seed(k)
        batch = buffer.sample(1500, frame_stack=k, horizon=horizon)
        seen = check_batch(batch, envs, per_env, k, horizon)
        assert seen == valid_starts(envs, per_env, k, horizon)
    batch = buffer.sample(500, frame_stack=3, goal="future")
    assert (batch["goal", "state"][:, :2] == batch["state"][:, :2]).all()
    stored = {(env, e, s) for env in range(3) for e, s, _ in envs.stored(env, per_env)}
    assert {tuple(c) for c in batch["goal", "state"].long().tolist()} <= stored
    goals = decode(batch["goal", "pixels"]).flatten(0, 1)
    assert {tuple(c) for c in goals.tolist()} <= stored, "a goal stack read an overwritten frame"


def test_one_rollout_equals_single_steps():
    a, b, c = FakeEnvs(LENGTHS), FakeEnvs(LENGTHS), FakeEnvs(LENGTHS)
    by_step, by_rollout, by_chunks = ReplayBuffer(90), ReplayBuffer(90), ReplayBuffer(90)
    for _ in range(37):
        by_step.extend(a.step())
    by_rollout.extend(b.rollout(37))
    for steps in (10, 1, 26):
        by_chunks.extend(c.rollout(steps))
    reference = by_step.state_dict()
    for other in (by_rollout, by_chunks):
        state = other.state_dict()
        assert state["layout"] == reference["layout"]
        assert_same(TensorDict(state["storage"], [90]), TensorDict(reference["storage"], [90]))


def test_flat_dataset_and_synthesized_ids(tmp_path):
    envs = FakeEnvs([[6, 4]], ids=False)
    steps = envs.rollout(23)[0]  # [23] consecutive steps of one env, no episode / step keys
    dataset = ReplayBuffer.from_dataset(steps)
    assert len(dataset) == 23 and dataset.num_episodes == 5
    torch.manual_seed(0)
    batch = dataset.sample(300, frame_stack=2, horizon=2)
    assert (batch["step"] == batch["state"][..., 2].long()).all()
    assert (batch["episode"][:, 0] == batch["state"][:, 0, 1].long()).all()  # numbered 0, 1, ... here
    assert (decode(batch["pixels"])[..., 1, :] == batch["state"].long()).all()

    steps.memmap(tmp_path / "flat")
    loaded = ReplayBuffer.load(tmp_path / "flat")
    torch.manual_seed(0)
    assert (loaded.sample(300, frame_stack=2, horizon=2) == batch).all()

    with pytest.raises(ValueError, match="num_envs"):
        dataset.extend(FakeEnvs([[6], [6]]).step())


@pytest.mark.parametrize("on_disk", [False, True])
def test_save_load_round_trip(tmp_path, on_disk):
    envs = FakeEnvs(LENGTHS, size=8)
    buffer = ReplayBuffer(60, path=tmp_path / "live" if on_disk else None)
    buffer.extend(envs.rollout(30))  # wraps around
    buffer.extend(envs.step())
    buffer.save(tmp_path / "saved")
    if on_disk:
        buffer.save(tmp_path / "live")  # in place: metadata only
    loaded = ReplayBuffer.load(tmp_path / "saved")
    assert isinstance(loaded.storage["pixels"], MemoryMappedTensor)
    assert len(loaded) == len(buffer) and loaded.num_episodes == buffer.num_episodes
    settings = ({"frame_stack": 3}, {"frame_stack": 2, "horizon": 3, "goal": "future"}, {"goal": "random"})
    for kwargs in settings:
        torch.manual_seed(7)
        expected = buffer.sample(64, **kwargs)
        torch.manual_seed(7)
        assert (loaded.sample(64, **kwargs) == expected).all()
    if on_disk:
        reopened = ReplayBuffer.load(tmp_path / "live")
        torch.manual_seed(7)
        expected = buffer.sample(64, frame_stack=3)
        torch.manual_seed(7)
        assert (reopened.sample(64, frame_stack=3) == expected).all()


@pytest.mark.parametrize("on_disk", [False, True])
def test_state_dict_round_trip(tmp_path, on_disk):
    envs = FakeEnvs(LENGTHS)
    path = tmp_path / "buffer" if on_disk else None
    buffer = ReplayBuffer(200, path=path)
    buffer.extend(envs.rollout(20))
    buffer.extend(envs.rollout(3).exclude("action", "skill"), actions=False)
    plain_types_only(buffer.state_dict())  # no numpy arrays, TensorDicts, MemoryMappedTensors or classes
    state = torch.load(_saved(tmp_path, buffer.state_dict()), weights_only=True)
    restored = ReplayBuffer(200, path=path)
    restored.load_state_dict(state)
    assert len(restored) == len(buffer)
    assert (restored.episodes() == buffer.episodes()).all()
    torch.manual_seed(3)
    expected = buffer.sample(100, frame_stack=2, horizon=2)
    torch.manual_seed(3)
    assert (restored.sample(100, frame_stack=2, horizon=2) == expected).all()
    restored.extend(envs.step())  # carries on where the checkpoint stopped
    assert len(restored) == len(buffer) + 3


@pytest.mark.parametrize("capacity", [4000, 60])  # mostly empty; wrapped round (FIFO) several times
def test_checkpoint_holds_only_the_rows_written(tmp_path, capacity):
    envs = FakeEnvs(LENGTHS)
    buffer = ReplayBuffer(capacity)
    buffer.extend(envs.rollout(20))
    state = torch.load(_saved(tmp_path, buffer.state_dict()), weights_only=True)
    saved_rows = next(iter(TensorDict(state["storage"]).values(True, True))).shape[0]
    per_env = capacity // buffer.num_envs
    assert state["rows_per_env"] == min(per_env, int(buffer._hi.max()))
    if capacity == 4000:
        assert state["rows_per_env"] < per_env // 10 and saved_rows == buffer.num_envs * state["rows_per_env"]
    restored = ReplayBuffer(capacity)
    restored.load_state_dict(state)
    torch.manual_seed(3)
    expected = buffer.sample(100, frame_stack=2, horizon=2)
    torch.manual_seed(3)
    assert (restored.sample(100, frame_stack=2, horizon=2) == expected).all()
    # a checkpoint written before only the written rows were kept (the whole storage) still loads
    legacy = {"layout": state["layout"], "storage": buffer.storage.to_dict()}
    old = ReplayBuffer(capacity)
    old.load_state_dict(legacy)
    torch.manual_seed(3)
    assert (old.sample(100, frame_stack=2, horizon=2) == expected).all()


def _saved(tmp_path, obj):
    torch.save(obj, tmp_path / "state.pt")
    return tmp_path / "state.pt"


def test_memory_is_about_one_frame_per_step():
    envs = FakeEnvs([[50]] * 4, size=64)
    buffer = ReplayBuffer(4 * 102)
    buffer.extend(envs.rollout(100))
    data = buffer.storage
    stored = sum(x.numel() * x.element_size() for x in data.values(True, True))
    frame = 3 * 64 * 64
    assert data["pixels"].shape[0] == buffer.capacity  # one frame per row, no stacked or next frames
    assert stored / len(buffer) < 1.05 * frame


def test_keys_restrict_observations():
    buffer = ReplayBuffer(100)
    buffer.extend(FakeEnvs(LENGTHS).rollout(10))
    batch = buffer.sample(8, keys=("pixels",))
    assert "pixels" in batch.keys() and "state" not in batch.keys() and "physics" not in batch.keys()
    assert set(batch["next"].keys()) == {"pixels", "reward", "terminated", "truncated", "done"}


def test_reward_free_data_and_cut_episodes():
    envs = FakeEnvs([[6]], reward=False)
    buffer = ReplayBuffer(100)
    buffer.extend(envs.rollout(3))
    envs.episode[0], envs.t[0] = 5, 0  # the env was reset without a done flag
    buffer.extend(envs.rollout(2))
    assert "reward" not in buffer.sample(4)["next"].keys()
    assert buffer.num_episodes == 2
    with pytest.raises(ValueError, match="longer than every stored episode"):
        buffer.sample(4, horizon=4)
    batch = buffer.sample(200, horizon=2, frame_stack=2)
    assert (batch["episode"][:, 0] == batch["episode"][:, 1]).all()
    last = buffer.sample(200, goal="future")
    # the cut episode ends at its last stored (pending) observation
    assert ((last["episode"] != 0) | (last["goal", "step"] <= 3)).all()


def test_errors(tmp_path):
    buffer = ReplayBuffer(100)
    with pytest.raises(RuntimeError, match="empty"):
        buffer.sample(4)
    with pytest.raises(RuntimeError, match="empty"):
        buffer.save(tmp_path / "x")
    envs = FakeEnvs(LENGTHS)
    with pytest.raises(ValueError, match="batch"):
        buffer.extend(envs.rollout(2).unsqueeze(0))
    with pytest.raises(KeyError, match="next"):
        buffer.extend(envs.step().exclude("next"))
    with pytest.raises(KeyError, match="action"):
        buffer.extend(envs.step().exclude("action"))
    buffer.extend(envs.rollout(8))
    with pytest.raises(KeyError, match="unknown observation keys"):
        buffer.sample(4, keys=("pixels", "rgb"))
    with pytest.raises(ValueError, match="longer than every stored episode"):
        buffer.sample(4, horizon=8)
    with pytest.raises(ValueError, match="frame_stack"):
        buffer.sample(4, frame_stack=0)
    with pytest.raises(ValueError, match="goal"):
        buffer.sample(4, goal="past")
    with pytest.raises(ValueError, match="future_discount"):
        buffer.sample(4, goal="future", future_discount=1.0)
    with pytest.raises(ValueError, match="env streams"):
        buffer.extend(FakeEnvs([[5]]).step())
    with pytest.raises(KeyError, match="observation keys"):
        buffer.extend(envs.step().exclude("physics", ("next", "physics")))
    with pytest.raises(ValueError, match="dtype"):
        step = envs.step()
        step["action"] = step["action"].double()
        buffer.extend(step)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(5).extend(envs.step())
    with pytest.raises(KeyError, match="physics"):
        ReplayBuffer.relabel(None, buffer.sample(4, keys=("state",)))
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.load(tmp_path / "missing")
    buffer.save(tmp_path / "saved")
    with pytest.raises(FileExistsError):
        ReplayBuffer(100, path=tmp_path / "saved")


def test_relabel_matches_rewards_at_collection():
    from latentrl.envs.tasks import get_physics_state, get_task

    task = get_task("point_mass-easy")
    env = task.make_dm_env(seed=0)
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(200)
    for _ in range(2):  # two short episodes, truncated by hand
        env.reset()
        for t in range(40):
            physics = torch.as_tensor(get_physics_state(env.physics))
            action = rng.uniform(-1, 1, size=env.action_spec().shape).astype(np.float32)
            time_step = env.step(action)
            done = t == 39
            buffer.extend(TensorDict({
                "physics": physics, "action": torch.as_tensor(action), "episode": torch.tensor(0), "step": t,
                "next": {"physics": torch.as_tensor(get_physics_state(env.physics)),
                         "reward": torch.tensor([time_step.reward], dtype=torch.float32),
                         "done": torch.tensor([done]), "terminated": torch.tensor([False]),
                         "truncated": torch.tensor([done])},
            }, []).unsqueeze(0))
    torch.manual_seed(0)
    for horizon in (1, 3):
        batch = buffer.sample(64, horizon=horizon)
        collected = batch["next", "reward"].clone()
        assert collected.std() > 0  # the check below can fail
        batch["next", "reward"].fill_(float("nan"))
        out = buffer.relabel(task, batch)
        assert out is batch and out["next", "reward"].shape == collected.shape
        torch.testing.assert_close(out["next", "reward"], collected, atol=1e-5, rtol=1e-5)
    other = buffer.relabel(get_task("point_mass-hard"), buffer.sample(16).exclude(("next", "reward")))
    assert other["next", "reward"].shape == (16, 1) and torch.isfinite(other["next", "reward"]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_samples_on_device():
    buffer = ReplayBuffer(100, device="cuda")
    buffer.extend(FakeEnvs(LENGTHS).rollout(10))
    batch = buffer.sample(8, frame_stack=2, goal="future")
    assert batch["pixels"].is_cuda and batch["goal", "pixels"].is_cuda


def test_end_episodes_keeps_a_restarted_stream_from_joining_the_old_episode():
    from tensordict import TensorDict

    def step(ep, t, done=False):
        obs = {"state": torch.full((1, 2), float(100 * ep + t)), "episode": torch.tensor([ep]),
               "step": torch.tensor([t])}
        nxt = {"state": torch.full((1, 2), float(100 * ep + t + 1)), "episode": torch.tensor([ep]),
               "step": torch.tensor([t + 1]), "reward": torch.zeros(1, 1),
               "done": torch.tensor([[done]]), "terminated": torch.tensor([[False]]),
               "truncated": torch.tensor([[done]])}
        return TensorDict({**obs, "action": torch.zeros(1, 1), "next": TensorDict(nxt, [1])}, [1])

    buffer = ReplayBuffer(100)
    for t in range(3):
        buffer.extend(step(0, t))
    buffer.end_episodes()  # the run stopped here; a resumed env starts episode 0 again
    for t in range(3):
        buffer.extend(step(0, t))
    batch = buffer.sample(500)
    # every transition moves one step forward within its episode: none joins old step 3 to new step 0
    assert torch.equal(batch["next", "state"][:, 0] - batch["state"][:, 0], torch.ones(500))
    assert buffer.num_episodes == 2


# ---------------------------------------------------------------- contracts v2: is_first, episodes, offsets, video


def stored_segments(envs: FakeEnvs, per_env: int) -> dict:
    """Ground truth of ``episodes()``: (env, episode) -> (absolute start row, first stored step, stored rows,
    complete) for every episode with a row in a ring of ``per_env`` rows."""
    out = {}
    for env in range(envs.num_envs):
        rows = envs.stored(env, per_env)
        total = len(envs.rows[env]) + (envs.t[env] > 0)  # rows ever written, the pending one included
        for i, (episode, t, _) in enumerate(rows):
            start, first_t, n, _ = out.get((env, episode), (total - len(rows) + i, t, 0, False))
            out[env, episode] = (start, first_t, n + 1, t == envs.length(env, episode))
    return out


def check_episodes(buffer: ReplayBuffer, envs: FakeEnvs, per_env: int) -> TensorDict:
    """``episodes()`` against the ground truth; ids must be the episodes' start order (``envs.started``)."""
    table = buffer.episodes()
    truth = stored_segments(envs, per_env)
    assert len(table) == len(truth) == buffer.num_episodes
    assert table["id"].tolist() == sorted(table["id"].tolist())
    for id_, env, start, first_step, length, complete in zip(*(table[k].tolist() for k in (
            "id", "env", "start", "first_step", "length", "complete")), strict=True):
        assert envs.started[id_][0] == env
        assert truth[envs.started[id_]] == (start, first_step, length, complete)
        segment = buffer.episode(id_, keys=("state",))
        assert (segment["segment_id"] == id_).all(), "the episode's rows disagree on its id"
        assert segment["state"][:, :2].long().unique(dim=0).tolist() == [list(envs.started[id_])]
    return table


def test_is_first_marks_episode_starts():
    envs = FakeEnvs([[7, 5], [9], [3, 11]])
    buffer = ReplayBuffer(3 * 16 + 2)  # 16 rows per stream: wraps, some episodes lose their first rows
    buffer.extend(envs.rollout(40))
    torch.manual_seed(0)
    batch = buffer.sample(2000, frame_stack=2)
    assert batch["is_first"].dtype == torch.bool and batch["is_first"].shape == (2000,)
    assert torch.equal(batch["is_first"], batch["step"] == 0)
    assert batch["is_first"].any() and not batch["is_first"].all()
    assert torch.equal(batch["segment_step"], batch["step"])
    sliced = buffer.sample(1000, horizon=3)
    assert sliced["is_first"].shape == sliced["segment_step"].shape == (1000, 3)
    assert torch.equal(sliced["is_first"], sliced["step"] == 0) and sliced["is_first"][:, 0].any()
    assert torch.equal(sliced["segment_step"], sliced["step"])
    pairs = buffer.sample(1000, offset=2)
    assert torch.equal(pairs["is_first"], pairs["step"] == 0) and pairs["is_first"].any()
    assert torch.equal(pairs["segment_step"], pairs["step"])
    table = check_episodes(buffer, envs, 16)
    cut = table[table["first_step"] > 0]
    assert len(cut) > 0, "no stored episode lost its first rows: the check below would be empty"
    for id_, first_step in zip(cut["id"].tolist(), cut["first_step"].tolist(), strict=True):
        segment = buffer.episode(id_, frame_stack=2)
        assert not segment["is_first"].any()  # its first observation is gone
        assert segment["segment_step"].tolist() == list(range(first_step, first_step + len(segment)))
        assert decode(segment["pixels"][0])[:, 2].tolist() == [first_step, first_step]  # clamped there


def test_episode_ids_are_stable(tmp_path):
    envs = FakeEnvs(LENGTHS)
    per_env = 30
    buffer = ReplayBuffer(3 * per_env)
    buffer.extend(envs.rollout(12))
    table = check_episodes(buffer, envs, per_env)
    assert table["id"].tolist() == list(range(len(table)))  # nothing overwritten yet: 0 .. N - 1
    assert (buffer.episodes() == table).all()
    for _ in range(3):  # more writes, one step at a time: the ring drops the oldest episodes
        buffer.extend(envs.rollout(8))
        table = check_episodes(buffer, envs, per_env)
    assert table["id"][0] > 0, "no episode was overwritten"
    torch.manual_seed(0)
    batch = buffer.sample(1000, horizon=2)
    for id_, code in zip(batch["segment_id"].reshape(-1).tolist(), batch["state"].reshape(-1, 3).long().tolist(),
                         strict=True):
        assert envs.started[id_] == (code[0], code[1])

    buffer.save(tmp_path / "saved")
    loaded = ReplayBuffer.load(tmp_path / "saved", writable=True)  # extended below
    assert (loaded.episodes() == table).all()
    restored = ReplayBuffer(3 * per_env)
    restored.load_state_dict(torch.load(_saved(tmp_path, buffer.state_dict()), weights_only=True))
    assert (restored.episodes() == table).all()
    for other in (loaded, restored):  # they carry on numbering where the buffer stopped
        other_envs = FakeEnvs(LENGTHS)
        other_envs.__dict__.update({k: copy.deepcopy(v) for k, v in envs.__dict__.items()})
        other.extend(other_envs.rollout(9))
        check_episodes(other, other_envs, per_env)


def test_episode_reads_one_segment():
    envs = FakeEnvs(LENGTHS)
    buffer = ReplayBuffer(1000)
    buffer.extend(envs.rollout(20))
    table = check_episodes(buffer, envs, 1000)
    rows = {(env, e, s): is_t for env in range(3) for e, s, is_t in envs.stored(env, 1000)}
    for id_, length in zip(table["id"].tolist(), table["length"].tolist(), strict=True):
        env, episode = envs.started[id_]
        segment = buffer.episode(id_, frame_stack=3)
        assert segment.batch_size == (length,)
        assert segment["state"].long().tolist() == [[env, episode, t] for t in range(length)]
        expected = [[[env, episode, max(t - j, 0)] for j in (2, 1, 0)] for t in range(length)]
        assert decode(segment["pixels"]).tolist() == expected
        is_t = [rows[env, episode, t] for t in range(length)]
        assert segment["has_action"].tolist() == is_t
        actions = [[env, episode, t] if is_t[t] else [0, 0, 0] for t in range(length)]
        assert segment["action"].tolist() == actions
        assert segment["is_first"].tolist() == [t == 0 for t in range(length)]
        assert (segment["segment_id"] == id_).all() and segment["segment_step"].tolist() == list(range(length))
        assert segment["next", "reward"][:, 0].isnan().tolist() == [not x for x in is_t]
        ended = length - 1 == envs.length(env, episode)
        assert segment["next", "done"][:, 0].tolist() == [ended and t == length - 2 for t in range(length)]
    assert set(buffer.episode(0, keys=("state",)).keys()) >= {"state", "action", "is_first", "segment_id"}
    assert "pixels" not in buffer.episode(0, keys=("state",)).keys()
    with pytest.raises(KeyError, match="episode id 999 is not stored"):
        buffer.episode(999)


@pytest.mark.parametrize("frame_stack", [1, 2])
def test_fixed_offset_pairs(frame_stack):
    envs = FakeEnvs([[7, 5], [9], [3, 11]])
    per_env = 16
    buffer = ReplayBuffer(3 * per_env + 2)
    for chunk in (5, 12, 20):  # wraps round
        buffer.extend(envs.rollout(chunk))
    for k in (1, 2, 4, 8):
        torch.manual_seed(k)
        batch = buffer.sample(1500, offset=k, frame_stack=frame_stack)
        assert batch.batch_size == (1500,) and (batch["offset"] == k).all()
        obs, target = batch["state"].long(), batch["target", "state"].long()
        assert torch.equal(target[:, :2], obs[:, :2]), "a pair crosses episodes"
        assert torch.equal(target[:, 2], obs[:, 2] + k)
        assert torch.equal(batch["target", "step"], target[:, 2])
        ends = torch.tensor([envs.length(e, ep) for e, ep in obs[:, :2].tolist()])
        assert (target[:, 2] <= ends).all() and (target[:, 2] == ends).any()  # o_{t+k} may be the final obs
        expected = obs[:, None, :].float() + torch.tensor([0.0, 0.0, 1.0]) * torch.arange(k)[:, None]
        assert batch["action"].shape == (1500, k, 3) and torch.equal(batch["action"], expected)
        assert batch["has_action"].all()
        for key, t in (("pixels", obs[:, 2]), (("target", "pixels"), target[:, 2])):
            assert batch[key].shape == (1500, 3 * frame_stack, 4, 4)
            stack = decode(batch[key])
            assert torch.equal(stack[..., :2], obs[:, None, :2].expand(-1, frame_stack, -1))
            assert torch.equal(stack[..., 2], (t[:, None] + torch.arange(1 - frame_stack, 1)).clamp_min(0))
        assert torch.equal(batch["target", "physics"], target.double())
        seen = {tuple(c) for c in obs.tolist()}
        assert seen == valid_starts(envs, per_env, frame_stack, k)  # every start whose pair is stored
    with pytest.raises(ValueError, match="offset must be a positive int"):
        buffer.sample(4, offset=0)
    with pytest.raises(ValueError, match="no horizon or goal"):
        buffer.sample(4, offset=2, horizon=3)
    with pytest.raises(ValueError, match="offset 12 is longer than every stored episode"):
        buffer.sample(4, offset=12)


def test_action_less_segments():
    envs = FakeEnvs(LENGTHS)
    buffer = ReplayBuffer(1000)
    video = set()  # (env, episode, step) of the steps written without actions

    def video_steps(n, placeholder=False):
        td = envs.rollout(n) if n > 1 else envs.step()
        video.update(map(tuple, td["state"].reshape(-1, 3).long().tolist()))
        if placeholder:  # a video loader's NaN action: ignored, stored as zero
            return td.exclude("skill", ("next", "reward")).set("action", torch.full_like(td["action"], float("nan")))
        return td.exclude("action", "skill", ("next", "reward"))

    buffer.extend(envs.rollout(6))
    buffer.extend(video_steps(9), actions=False)
    buffer.extend(envs.rollout(4))
    buffer.extend(video_steps(1, placeholder=True), actions=False)  # one [num_envs] step
    buffer.extend(envs.rollout(3))
    torch.manual_seed(0)
    for batch in (buffer.sample(3000), buffer.sample(1000, horizon=2).reshape(-1)):
        codes = batch["state"].long()
        is_video = torch.tensor([tuple(c) in video for c in codes.tolist()])
        assert is_video.any() and (~is_video).any(), "the mixed buffer should sample both kinds"
        assert torch.equal(batch["has_action"], ~is_video)
        assert (batch["action"][is_video] == 0).all() and (batch["skill"][is_video] == 0).all()
        assert torch.equal(batch["action"][~is_video], codes[~is_video].float())
        reward = batch["next", "reward"]
        assert reward[is_video].isnan().all() and not reward[~is_video].isnan().any()
    pairs = buffer.sample(3000, offset=3)
    expected = torch.tensor([all((e, ep, t + j) not in video for j in range(3))
                             for e, ep, t in pairs["state"].long().tolist()])
    assert torch.equal(pairs["has_action"], expected) and expected.any() and (~expected).any()
    table = buffer.episodes()
    for id_, has_action in zip(table["id"].tolist(), table["has_action"].tolist(), strict=True):
        assert has_action == all(envs.started[id_] != (e, ep) for e, ep, _ in video)
    assert not table["has_action"].all() and table["has_action"].any()
    with pytest.raises(KeyError, match="actions=False"):
        buffer.extend(envs.step().exclude("action"))

    # a buffer whose first steps are action-less: with an action shape it takes actions later
    clip = FakeEnvs([[5]])
    first = ReplayBuffer(100)
    first.extend(clip.rollout(6).exclude("action", "skill"), actions=False, action_shape=3)
    first.extend(clip.rollout(6).exclude("skill"))
    batch = first.sample(500)
    assert batch["action"].shape == (500, 3)
    has = batch["step"].long() + 5 * batch["episode"]  # episodes 0 (steps 0-4) and the first step of 1: video
    assert torch.equal(batch["has_action"], has >= 6) and batch["has_action"].any()
    # ... without one it stores no action column and refuses steps with actions
    bare = ReplayBuffer(100)
    bare.extend(FakeEnvs([[5]]).rollout(6).exclude("action", "skill"), actions=False)
    assert "action" not in bare.sample(8).keys() and not bare.sample(8)["has_action"].any()
    assert bare.sample(8, offset=2)["has_action"].shape == (8,)
    with pytest.raises(ValueError, match="action_shape"):
        bare.extend(FakeEnvs([[5]]).rollout(2))


def write_format_1(buffer: ReplayBuffer, path):
    """What the format-1 buffer's ``save`` wrote: TorchRL's ``LazyMemmapStorage.dumps`` of its rows (no
    ``segment`` / ``has_action`` columns) and a ``replay.json`` without the segment positions."""
    from torchrl.data import LazyMemmapStorage

    rows = buffer.storage.exclude(("_replay", "segment"), ("_replay", "has_action")).clone()
    storage = LazyMemmapStorage(rows.shape[0], scratch_dir=path / "scratch")
    storage.set(torch.arange(rows.shape[0]), rows)
    storage.dumps(path / "storage")
    meta = format_1_layout(buffer)
    (path / "replay.json").write_text(json.dumps(meta))
    return rows


def format_1_layout(buffer: ReplayBuffer) -> dict:
    meta = buffer.state_dict()["layout"]
    del meta["cur_segment"], meta["next_segment_id"]
    return meta | {"format": "latentrl.replay/1"}


def test_format_1_dataset_and_checkpoint_load(tmp_path):
    envs = FakeEnvs(LENGTHS, size=8)
    buffer = ReplayBuffer(60)
    buffer.extend(envs.rollout(30))  # wraps around
    buffer.extend(envs.step())
    rows = write_format_1(buffer, tmp_path / "v1")
    assert (tmp_path / "v1" / "storage" / "storage_metadata.json").exists()  # TorchRL's own file
    loaded = ReplayBuffer.load(tmp_path / "v1", writable=True)  # extended and saved in place below
    assert isinstance(loaded.storage["pixels"], MemoryMappedTensor)  # opened in place
    assert len(loaded) == len(buffer) and loaded.num_episodes == buffer.num_episodes
    settings = ({"frame_stack": 3}, {"frame_stack": 2, "horizon": 3, "goal": "future"}, {"goal": "random"},
                {"offset": 2, "frame_stack": 2})
    for kwargs in settings:
        torch.manual_seed(7)
        expected = buffer.sample(64, **kwargs)
        torch.manual_seed(7)
        assert_same(loaded.sample(64, **kwargs).exclude("segment_id"), expected.exclude("segment_id"))
    # ids are derived from the stored rows: the same every time the folder is opened, 0 .. N - 1
    table = loaded.episodes()
    assert table["id"].tolist() == list(range(len(table)))
    assert (ReplayBuffer.load(tmp_path / "v1").episodes() == table).all()
    by_row = lambda t: t[(t["env"] * 10**6 + t["start"]).argsort()].exclude("id")  # noqa: E731
    assert (by_row(table) == by_row(buffer.episodes())).all()
    loaded.extend(envs.step())  # writes on, with ids following the derived ones
    grown = loaded.episodes()
    assert grown["id"].unique().numel() == len(grown) and 0 <= int(grown["id"].min())
    assert int(grown["id"].max()) < len(table) + 3
    for id_ in grown["id"].tolist():
        assert (loaded.episode(id_)["segment_id"] == id_).all(), "an episode continued under another id"
    loaded.save(tmp_path / "v1")  # in place: format 2 from now on
    assert json.loads((tmp_path / "v1" / "replay.json").read_text())["format"] == "latentrl.replay/2"
    assert (ReplayBuffer.load(tmp_path / "v1").episodes() == loaded.episodes()).all()

    # a checkpoint of the format-1 buffer (rows written so far, plain tensors)
    state = {"layout": format_1_layout(buffer), "storage": rows.to_dict(), "rows_per_env": 20}
    restored = ReplayBuffer(60)
    restored.load_state_dict(torch.load(_saved(tmp_path, state), weights_only=True))
    torch.manual_seed(3)
    expected = buffer.sample(100, frame_stack=2, horizon=2)
    torch.manual_seed(3)
    assert_same(restored.sample(100, frame_stack=2, horizon=2).exclude("segment_id"),
                expected.exclude("segment_id"))
    assert (restored.episodes() == table).all()


def plain_types_only(obj, where="state_dict"):
    """Raise if ``obj`` holds anything but tensors, dicts, lists, str, int, float, bool and None."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str), f"{where} has a non-str key {key!r}"
            plain_types_only(value, f"{where}[{key!r}]")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            plain_types_only(value, f"{where}[{i}]")
    else:
        assert type(obj) in (torch.Tensor, str, int, float, bool, type(None)), f"{where} is a {type(obj)}"


def test_replay_owns_its_storage():
    import latentrl.replay

    sources = list(Path(latentrl.replay.__file__).parent.glob("*.py"))
    assert len(sources) >= 2
    for source in sources:
        text = source.read_text()
        assert "_storage" not in text, f"{source.name} reaches into a TorchRL storage"
        assert "import torchrl" not in text and "from torchrl" not in text, f"{source.name} imports torchrl"
    params = inspect.signature(ReplayBuffer.sample).parameters
    assert {"batch_size", "frame_stack", "horizon", "goal", "keys", "future_discount", "offset"} <= set(params)
