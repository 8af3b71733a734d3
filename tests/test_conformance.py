"""The conformance suite of contracts v2 (DESIGN.md): every registered agent and world model passes it.

Parametrized over ``latentrl.agents.AGENTS`` x observation type (pixels, state) with the ``smoke``
preset, and over ``latentrl.world_models.WORLD_MODELS``. A new agent is done when it is registered
and this file passes for it:

- the policy is an ``nn.Module`` that holds modules, not the agent;
- ``init_carry(n)`` gives a TensorDict ``[n]``; ``reset(mask)`` restarts exactly the masked envs;
- ``step`` is a function of ``(obs, carry, is_first)`` in eval mode: the same inputs and random state
  give the same action and carry, the input carry and the policy are left unchanged, and rows
  with ``is_first`` restart from a fresh carry (frame stack refilled with the new frame);
- ``save_model`` -> ``latentrl.load_policy`` gives the same actions, step after step, in a process
  that never imports ``latentrl.envs``;
- ``sample_spec`` -> a replay buffer filled by the agent's own exploring policy -> ``update`` changes
  the parameters and returns finite metrics;
- a training checkpoint (``weights_only``) loaded into a fresh agent makes exactly the saved agent's next update;
- the world model's declared capabilities are callable (on a slice batch ``[B, L]``: with its first
  step; ``decode`` gives one observation per latent), and its ``loss`` returns ``loss`` (a scalar
  with gradients into the model) and named terms.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from latentrl.agents import AGENTS, Agent, Policy, agent_class, sample_batches
from latentrl.agents.model_files import save_model
from latentrl.replay import ReplayBuffer
from latentrl.world_models import WORLD_MODELS, WorldModel

STATE_DIM, ACTION_DIM, IMAGE = 24, 6, 64
OBS_SHAPE = {"pixels": (3, IMAGE, IMAGE), "state": (STATE_DIM,)}
CASES = [(name, obs) for name in sorted(AGENTS) for obs in ("pixels", "state")]
ids = [f"{name}-{obs}" for name, obs in CASES]


def make(name: str, obs_type: str, seed: int = 0) -> Agent:
    torch.manual_seed(seed)
    cls = agent_class(name)
    return cls(cls.make_config("smoke", obs_type=obs_type), OBS_SHAPE[obs_type], ACTION_DIM, device="cpu")


def observations(obs_type: str, n: int, seed: int) -> TensorDict:
    """One newest observation of ``n`` envs: a single RGB frame or a state vector."""
    g = torch.Generator().manual_seed(seed)
    if obs_type == "pixels":
        value = torch.randint(0, 256, (n, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=g)
    else:
        value = torch.randn(n, STATE_DIM, generator=g)
    return TensorDict({obs_type: value}, batch_size=[n])


def task_for(agent: Agent, n: int):
    """A fixed task where the agent takes one (zero-shot agents: an inferred goal; METRA: a skill)."""
    if agent.name == "metra":
        g = torch.Generator().manual_seed(3)
        return agent.skill_task(torch.nn.functional.normalize(torch.randn(n, agent.config.dim_option, generator=g)))
    if agent.name in ("td_jepa", "fb", "active_inference"):
        from latentrl.agents import GoalObservation

        return agent.infer_task(GoalObservation(observations(agent.config.obs_type, n, seed=4)))
    return None


def carries_equal(a: TensorDict, b: TensorDict) -> bool:
    return sorted(a.keys(True, True)) == sorted(b.keys(True, True)) and all(
        torch.equal(a[k], b[k]) for k in a.keys(True, True))


def holds_agent(obj, seen=None) -> bool:
    """Whether ``obj`` reaches an Agent through its attributes (modules, lists, dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, Agent):
        return True
    if isinstance(obj, nn.Module):
        children = [*vars(obj).values(), *obj._modules.values()]
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    else:
        return False
    return any(holds_agent(c, seen) for c in children)


# ------------------------------------------------------------------------------------------ policy


@pytest.mark.parametrize(("name", "obs_type"), CASES, ids=ids)
def test_policy_is_a_module_of_its_own(name, obs_type):
    agent = make(name, obs_type)
    for policy in (agent.policy(explore=False), agent.policy(explore=True)):
        assert isinstance(policy, Policy) and isinstance(policy, nn.Module)
        assert not holds_agent(policy), f"{type(policy).__name__} holds the agent; a policy holds only its modules"
        assert policy.obs_key == obs_type and policy.action_dim == ACTION_DIM


@pytest.mark.parametrize(("name", "obs_type"), CASES, ids=ids)
def test_init_carry(name, obs_type):
    policy = make(name, obs_type).policy()
    carry = policy.init_carry(5)
    assert isinstance(carry, TensorDict) and carry.batch_size == torch.Size([5])
    if obs_type == "pixels" and policy.frame_stack > 1:
        assert carry["frames"].shape == (5, policy.frame_stack, 3, IMAGE, IMAGE)


@pytest.mark.parametrize(("name", "obs_type"), CASES, ids=ids)
def test_step_is_pure_in_eval_mode(name, obs_type):
    agent = make(name, obs_type)
    agent.eval()
    n = 4
    policy = agent.policy(task_for(agent, n), explore=False)
    carry = policy.init_carry(n)
    first = torch.ones(n, dtype=torch.bool)
    _, carry = policy.step(observations(obs_type, n, seed=1), carry, first)  # a carry mid-episode
    obs, not_first = observations(obs_type, n, seed=2), torch.zeros(n, dtype=torch.bool)
    before_carry, before_state = carry.clone(), copy.deepcopy(policy.state_dict())
    before_attrs = {k: v for k, v in vars(policy).items() if not isinstance(v, (torch.Tensor, TensorDict))}
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        action, new_carry = policy.step(obs, carry, not_first)
        results.append((action, new_carry))
    assert torch.equal(results[0][0], results[1][0]), "step gave two actions for the same inputs"
    assert carries_equal(results[0][1], results[1][1]), "step gave two carries for the same inputs"
    assert carries_equal(carry, before_carry), "step modified its input carry"
    assert all(torch.equal(v, before_state[k]) for k, v in policy.state_dict().items()), "step changed the policy"
    assert {k: v for k, v in vars(policy).items() if not isinstance(v, (torch.Tensor, TensorDict))} == before_attrs
    assert results[0][0].shape == (n, ACTION_DIM) and results[0][0].abs().max() <= 1.0
    # and the convenience call agrees with step on the same inputs
    policy.reset()
    torch.manual_seed(11)
    a1 = policy(observations(obs_type, n, seed=1))
    a2 = policy(obs)
    torch.manual_seed(11)
    carry = policy.init_carry(n)
    b1, carry = policy.step(observations(obs_type, n, seed=1), carry, first)
    b2, _ = policy.step(obs, carry, not_first)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


@pytest.mark.parametrize(("name", "obs_type"), CASES, ids=ids)
def test_is_first_restarts_only_its_rows(name, obs_type):
    """A row with ``is_first`` acts as a fresh episode; the other rows keep their carry."""
    agent = make(name, obs_type)
    n = 3
    policy = agent.policy(explore=False)
    carry = policy.init_carry(n)
    _, carry = policy.step(observations(obs_type, n, seed=1), carry, torch.ones(n, dtype=torch.bool))
    _, carry = policy.step(observations(obs_type, n, seed=2), carry, torch.zeros(n, dtype=torch.bool))
    obs = observations(obs_type, n, seed=3)
    mask = torch.tensor([False, True, False])
    _, restarted = policy.step(obs, carry, mask)
    _, continued = policy.step(obs, carry, torch.zeros(n, dtype=torch.bool))
    for key in restarted.keys(True, True):
        keep = ~mask
        assert torch.equal(restarted[key][keep], continued[key][keep]), f"{key}: rows without is_first changed"
    if "frames" in restarted.keys():
        k = policy.frame_stack
        tiled = obs[obs_type][1].unsqueeze(0).expand(k, -1, -1, -1)
        assert torch.equal(restarted["frames"][1], tiled), "a restarted row's frame stack is not its first frame"
        assert torch.equal(continued["frames"][0, -1], obs[obs_type][0])  # newest frame last
        assert not torch.equal(continued["frames"][0, 0], obs[obs_type][0])
    for key in ("z", "skill"):  # a prior-drawn task vector is redrawn for the restarted row only
        if key in restarted.keys():
            assert not torch.equal(restarted[key][1], continued[key][1])


@pytest.mark.parametrize(("name", "obs_type"), CASES, ids=ids)
def test_reset_by_mask(name, obs_type):
    agent = make(name, obs_type)
    n = 3
    policy = agent.policy(explore=False)
    policy(observations(obs_type, n, seed=1))
    policy(observations(obs_type, n, seed=2))
    carry = policy.carry.clone()
    policy.reset(torch.tensor([True, False, False]))
    obs = observations(obs_type, n, seed=3)
    torch.manual_seed(5)
    action = policy(obs)
    torch.manual_seed(5)
    expected, expected_carry = policy.step(obs, carry, torch.tensor([True, False, False]))
    assert torch.equal(action, expected) and carries_equal(policy.carry, expected_carry)
    policy.reset()
    assert policy.carry is None


# ------------------------------------------------------------------------------------ models on disk


@pytest.mark.parametrize(("name", "obs_type"), CASES, ids=ids)
def test_saved_model_gives_identical_actions(name, obs_type, tmp_path):
    from latentrl import load_policy

    agent = make(name, obs_type)
    agent.eval()
    n = 3
    task = task_for(agent, n)
    policy = agent.policy(task, explore=False)
    save_model(tmp_path / "model", agent, task=task)
    loaded = load_policy(tmp_path / "model")
    assert type(loaded) is type(policy) and not loaded.training
    assert set(loaded.state_dict()) == set(policy.state_dict())
    for key, value in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    carry_a, carry_b = policy.init_carry(n), loaded.init_carry(n)
    if name == "metra" or task is None:  # prior draws in init_carry: give both the same carry
        carry_b = carry_a.clone()
    for t in range(3):
        obs = observations(obs_type, n, seed=10 + t)
        first = torch.full((n,), t == 0)
        torch.manual_seed(t)
        a, carry_a = policy.step(obs, carry_a, first)
        torch.manual_seed(t)
        b, carry_b = loaded.step(obs, carry_b, first)
        assert torch.equal(a, b), f"step {t}: the loaded policy acts differently"


def test_load_policy_needs_no_env_stack(tmp_path):
    agent = make("td_jepa", "state")
    save_model(tmp_path / "model", agent, task=task_for(agent, 2))
    code = (
        "import sys, torch, latentrl\n"
        "from tensordict import TensorDict\n"
        f"p = latentrl.load_policy({str(tmp_path / 'model')!r})\n"
        "obs = TensorDict({'state': torch.zeros(2, 24)}, batch_size=[2])\n"
        "a, _ = p.step(obs, p.init_carry(2), torch.ones(2, dtype=torch.bool))\n"
        "assert a.shape == (2, 6)\n"
        "stack = ('latentrl.envs', 'latentrl.training', 'latentrl.replay', 'dm_control', 'mujoco')\n"
        "bad = [m for m in sys.modules if m.startswith(stack)]\n"
        "print('imported:', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------ learning


def fixture_buffer(agent: Agent, obs_type: str, num_envs: int = 2, steps: int = 24) -> ReplayBuffer:
    """A small buffer filled by the agent's own exploring policy on random observations (episodes of
    ``steps`` steps; the agent's extras, e.g. METRA's skill, stored with each step)."""
    policy = agent.policy(explore=True)
    buffer = ReplayBuffer(4 * num_envs * (steps + 1))
    obs_seq = [observations(obs_type, num_envs, seed=100 + t) for t in range(steps + 1)]
    carry = policy.init_carry(num_envs)
    for t in range(steps):
        action, carry = policy.step(obs_seq[t], carry, torch.full((num_envs,), t == 0))
        td = obs_seq[t].clone()
        td["action"] = action
        for key, value in policy.extras(carry).items():
            td[key] = value
        last = torch.full((num_envs, 1), t == steps - 1)
        td["next"] = obs_seq[t + 1].clone().update({
            "reward": torch.zeros(num_envs, 1), "terminated": torch.zeros(num_envs, 1, dtype=torch.bool),
            "truncated": last, "done": last})
        buffer.extend(td)
    return buffer


@pytest.mark.parametrize(("name", "obs_type"), CASES, ids=ids)
def test_sample_spec_buffer_update(name, obs_type):
    agent = make(name, obs_type)
    buffer = fixture_buffer(agent, obs_type)
    batch = sample_batches(buffer, agent.sample_spec())
    before = {k: v.clone() for k, v in agent.state_dict().items() if v.is_floating_point()}
    metrics = agent.update(batch)
    # metrics are detached 0-dim float32 tensors on the agent's device (no host sync per update), finite here
    assert metrics and all(torch.is_tensor(v) and v.shape == () and v.dtype == torch.float32 and not v.requires_grad
                           and v.device == agent.device and torch.isfinite(v) for v in metrics.values())
    changed = [k for k, v in agent.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("world_model.") for k in changed), "update did not train the world model"
    assert any(not k.startswith("world_model.") for k in changed), "update trained nothing besides the world model"


@pytest.mark.parametrize(("name", "obs_type"), CASES, ids=ids)
def test_checkpoint_holds_everything_the_next_update_needs(name, obs_type, tmp_path):
    """A training checkpoint (read with ``weights_only=True``) loaded into a freshly built agent of another seed
    makes the next update exactly the one the saved agent makes: parameters, optimizer moments, target networks,
    duals, running statistics and counters all travel (a state kept outside ``state_dict``, the optimizers and
    ``extra_state`` shows as a different update)."""
    from latentrl.training.checkpoint import load_checkpoint, save_checkpoint

    agent = make(name, obs_type)
    buffer = fixture_buffer(agent, obs_type)
    batches = [sample_batches(buffer, agent.sample_spec()) for _ in range(3)]
    for batch in batches[:2]:  # two updates: moments, targets and counters have moved off their start
        agent.update(batch)
    path = save_checkpoint(tmp_path / "latest.pt", agent, counters={"env_steps": 0, "updates": 2, "episodes": 0},
                           config={})
    resumed = make(name, obs_type, seed=1)
    load_checkpoint(path, resumed, restore_rng_state=False)
    torch.manual_seed(5)
    expected = agent.update(batches[2])
    torch.manual_seed(5)
    got = resumed.update(batches[2])
    for key, value in agent.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), f"{key} differs after the resumed update"
    assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in expected.items()}


# ------------------------------------------------------------------------------------- world models


def world_model_cases():
    out = []
    for path, agent_name in WORLD_MODELS.items():
        for obs in ("pixels", "state"):
            out.append(pytest.param(path, agent_name, obs, id=f"{path.rsplit(':', 1)[1]}-{obs}"))
    return out


ABSTRACT_MODELS = {"latentrl.world_models.encoders:ObservationEncoder", "latentrl.world_models.zero_shot:ZeroShotModel"}


def test_every_world_model_is_registered():
    """Each concrete WorldModel in world_models/ is in WORLD_MODELS, so this suite checks it."""
    import pkgutil

    import latentrl.world_models as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"latentrl.world_models.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, WorldModel) and obj is not WorldModel \
                    and obj.__module__ == module.__name__:
                found.add(f"{obj.__module__}:{obj.__name__}")
    assert found - ABSTRACT_MODELS == set(WORLD_MODELS), "register new world models in WORLD_MODELS"


def loss_kwargs(agent: Agent, world_model: WorldModel) -> dict:
    params = inspect.signature(world_model.loss).parameters
    return {"next_action": agent.target_action} if "next_action" in params else {}


@pytest.mark.parametrize(("path", "agent_name", "obs_type"), world_model_cases())
def test_world_model_contract(path, agent_name, obs_type):
    module, cls_name = path.split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    agent = make(agent_name, obs_type)
    wm = agent.world_model
    assert isinstance(wm, cls) and isinstance(wm, WorldModel)
    assert cls.loss is not WorldModel.loss, f"{cls_name} has no loss of its own"
    buffer = fixture_buffer(agent, obs_type)
    batch = sample_batches(buffer, agent.sample_spec())
    out = wm.loss(batch, **loss_kwargs(agent, wm))
    assert isinstance(out, TensorDict) and "loss" in out.keys() and len(out.keys()) > 1
    loss = out["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    wm.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wm.parameters()), \
        "the loss has no gradient into the model"
    # every declared capability is callable with the contract's arguments (on a slice batch [B, L]: its
    # first step)
    if batch.batch_dims == 2:
        batch = batch[:, 0]
    obs = batch.select(obs_type)
    for capability in wm.capabilities:
        if capability == "encode":
            latent = wm.encode(obs)
            assert latent.shape[0] == batch.batch_size[0]
        elif capability == "successor":
            latent = wm.encode(obs)
            z = torch.nn.functional.normalize(torch.randn(latent.shape[0], wm.z_dim), dim=-1)
            out = wm.successor(latent, batch["action"], z)
            assert out.shape[-2:] == (latent.shape[0], wm.z_dim)
        elif capability == "sequence":
            check_sequence_contract(wm, obs, batch["action"])
        elif capability == "decode":
            decoded = wm.decode(wm.encode(obs))
            frame = (3, IMAGE, IMAGE) if obs_type == "pixels" else (STATE_DIM,)
            assert isinstance(decoded, TensorDict) and decoded[obs_type].shape == (batch.batch_size[0], *frame)
        elif capability == "infer":  # error regression on a one-step window [B, 1] gives a belief [B]
            belief = wm.infer(obs.unsqueeze(1), wm.initial_state(batch.batch_size[0]), 2)
            assert isinstance(belief, TensorDict) and belief.batch_size == batch.batch_size[:1]
        else:
            pytest.fail(f"the conformance suite has no check for capability {capability!r}; add one")
    for capability in {"decode", "sequence", "infer", "transition"} - set(wm.capabilities):
        method = {"decode": "decode", "sequence": "initial_state", "infer": "infer", "transition": "transition"}
        with pytest.raises(NotImplementedError, match=capability):
            fn = getattr(wm, method[capability])
            fn(*([None] * (len(inspect.signature(fn).parameters))))


def check_sequence_contract(wm: WorldModel, obs: TensorDict, action: torch.Tensor) -> None:
    """The recurrent contract: a belief TensorDict ``[B]``; ``observe`` restarts ``is_first`` rows from
    ``initial_state``; ``predict`` and ``imagine`` sample (two draws differ); ``imagine`` gives
    ``[B * num_samples, H]`` with row ``b``'s samples together."""
    n = obs.batch_size[0]
    state = wm.initial_state(n)
    assert isinstance(state, TensorDict) and state.batch_size == torch.Size([n])
    first = torch.ones(n, dtype=torch.bool)
    posterior = wm.observe(state, obs, torch.zeros_like(action), first)
    assert posterior.batch_size == torch.Size([n])
    later = wm.observe(posterior, obs, action, torch.zeros(n, dtype=torch.bool))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[0] = True
    torch.manual_seed(0)
    restarted = wm.observe(later, obs, action, mask)
    torch.manual_seed(0)
    from_scratch = wm.observe(wm.initial_state(n), obs, action, torch.ones(n, dtype=torch.bool))
    for key in restarted.keys(True, True):
        torch.testing.assert_close(restarted[key][0], from_scratch[key][0])
    torch.manual_seed(1)
    a = wm.predict(posterior, action)
    torch.manual_seed(2)
    b = wm.predict(posterior, action)
    assert any(not torch.equal(a[k], b[k]) for k in a.keys(True, True)), "predict returned the mean, not a sample"
    horizon, samples = 3, 4
    actions = action.unsqueeze(1).expand(-1, horizon, -1)
    rollouts = wm.imagine(posterior, actions, num_samples=samples)
    assert rollouts.batch_size[:2] == torch.Size([n * samples, horizon])
    first_key = next(iter(rollouts.keys(True, True)))
    row0 = rollouts[first_key][:samples, -1]
    assert not all(torch.equal(row0[0], row0[i]) for i in range(1, samples)), "imagine's samples do not diverge"


class ToyStateSpaceModel(WorldModel):
    """A Gaussian state-space model small enough to read: h' = tanh(W [h, a]) + sigma * eps; the posterior
    mixes in the observation. Only here to hold the base class's recurrent machinery to its contract."""

    capabilities = frozenset({"sequence"})

    def __init__(self, obs_dim: int = STATE_DIM, action_dim: int = ACTION_DIM, dim: int = 8):
        super().__init__()
        self.prior = nn.Linear(dim + action_dim, dim)
        self.post = nn.Linear(dim + obs_dim, dim)
        self.dim = dim

    def initial_state(self, batch_size):
        return TensorDict({"h": torch.zeros(batch_size, self.dim)}, batch_size=[batch_size])

    def observe(self, state, obs, prev_action, is_first):
        h = torch.where(is_first.reshape(-1, 1), self.initial_state(state.batch_size[0])["h"], state["h"])
        h = torch.tanh(self.post(torch.cat([h, obs["state"]], -1)))
        return TensorDict({"h": h}, batch_size=state.batch_size)

    def predict(self, state, action):
        mean = torch.tanh(self.prior(torch.cat([state["h"], action], -1)))
        return TensorDict({"h": mean + 0.1 * torch.randn_like(mean)}, batch_size=state.batch_size)

    def loss(self, batch):
        state = self.observe(self.initial_state(batch.batch_size[0]), batch, batch["action"],
                             torch.ones(batch.batch_size[0], dtype=torch.bool))
        nll = (self.predict(state, batch["action"])["h"] - self.post(
            torch.cat([state["h"], batch["next", "state"]], -1))).square().mean()
        return TensorDict({"loss": nll, "nll": nll.detach()}, batch_size=[])


def test_recurrent_contract_of_the_base_class():
    """The base class's sampled ``imagine`` and the sequence checks, on a toy state-space model."""
    wm = ToyStateSpaceModel()
    obs = observations("state", 5, seed=0)
    action = torch.rand(5, ACTION_DIM) * 2 - 1
    check_sequence_contract(wm, obs, action)
    with pytest.raises(NotImplementedError, match="infer"):
        wm.infer(None, None, 1)


def test_sequence_checks_catch_a_mean_prediction():
    """A model whose predict returns the mean (the old ``imagine`` bug) fails the contract."""

    class MeanModel(ToyStateSpaceModel):
        def predict(self, state, action):
            return TensorDict({"h": torch.tanh(self.prior(torch.cat([state["h"], action], -1)))},
                              batch_size=state.batch_size)

    with pytest.raises(AssertionError, match="mean, not a sample"):
        check_sequence_contract(MeanModel(), observations("state", 3, seed=0), torch.zeros(3, ACTION_DIM))


def test_unknown_capabilities_are_refused():
    with pytest.raises(TypeError, match="unknown capabilities"):
        type("Bad", (WorldModel,), {"capabilities": frozenset({"teleport"})})


def test_named_sample_requests_are_served_together():
    """``sample_spec()`` may return several named requests; ``update`` then gets one batch per name."""
    from latentrl.agents import SampleSpec

    agent = make("td_jepa", "state")
    buffer = fixture_buffer(agent, "state")
    spec = {"pairs": SampleSpec(batch_size=8, keys=("state",)), "slices": SampleSpec(batch_size=3, horizon=4),
            "probes": SampleSpec(batch_size=5, offset=2)}
    batch = sample_batches(buffer, spec)
    assert set(batch.keys()) == {"pairs", "slices", "probes"}
    assert batch["pairs"].batch_size == (8,) and batch["slices"].batch_size == (3, 4)
    assert batch["probes"]["action"].shape == (5, 2, ACTION_DIM)
    with pytest.raises(TypeError, match="SampleSpec"):
        sample_batches(buffer, {"bad": {"batch_size": 4}})
