"""Data-parallel learners (training/distributed.py): 2 gloo processes on the CPU against one process.

- The parameters (and every buffer: EMA targets, normalisers, optimizer moments) after k updates of 2 ranks,
  each on its half of the global batch, equal one process's on the whole batch (within 1e-5), for TD-JEPA,
  METRA, FB, PV-RNN (with its adaptive-vector store: values, row assignment and recycling, per-entry Adam
  moments and counts), StaMo (action-labelled rows on one rank only: probe statistics, masked probe loss) and
  active inference (free nats active, transition KL masked differently per rank); and the two ranks hold
  bitwise identical agents.
- ``torchrun`` runs of ``train_agent.py``: rank 0 alone writes the run's files; a rank killed mid-run stops
  the job with a message naming it, and ``resume=true`` continues from the checkpoint; a resume with another
  world size re-shards an offline run and is refused for an online one.

Random draws: a rank draws noise for its rows only, one process for all rows, so the draws would differ.
:class:`GlobalDraws` (test only) makes each draw of an update a function of the update, the call and the
global row: a draw of ``b`` rows on rank ``r`` is rows ``r*b .. (r+1)*b`` of the draw one process makes
for the ``B = W*b`` rows, from a generator seeded identically everywhere. Draws over the global batch (the
``z`` mixing under data parallelism) are made whole on every rank. Everything else (gradients, gathers,
normaliser statistics) is the code under test.

Workers are this file run as a script (``python tests/test_distributed.py worker ...``), one per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FREE_NATS = 0.6
"""Active inference's free nats here: between the two ranks' masked transition-KL means in some updates, so a
clamp of each rank's own mean (not the global one) changes the gradient."""
GLOBAL_BATCH, UPDATES = 10, 6  # 5 rows per rank: no other dim of the draws is 5 (actions 6, latents 8 / 16 / 32)
AGENT_OVERRIDES = {
    "td_jepa": {"batch_size": GLOBAL_BATCH, "lr_phi": 1e-3, "lr_psi": 1e-3, "lr_predictor": 1e-3,
                "lr_actor": 1e-3},
    "metra": {"obs_type": "state", "batch_size": GLOBAL_BATCH, "obs_normalizer_warmup": 4, "lr": 1e-3},
    "fb": {"batch_size": GLOBAL_BATCH, "lr_f": 1e-3, "lr_b": 1e-3, "lr_actor": 1e-3},
    "pv_rnn": {"obs_type": "state", "batch_size": GLOBAL_BATCH, "lr": 1e-2},
    "stamo": {"obs_type": "state", "batch_size": GLOBAL_BATCH, "probe_batch_size": GLOBAL_BATCH, "lr": 1e-3},
    "active_inference": {"obs_type": "state", "batch_size": GLOBAL_BATCH, "free_nats": FREE_NATS},
}
FLAT_ROWS = {"active_inference": (1, 3)}
"""Draws over flattened ``[B * m]`` rows (active inference's posterior noise over ``[B, L + 1]`` observations)."""
ADAM_EPS = 1e-4
"""Adam's eps in these tests (1e-8 in the agents). Some parameters have an analytically zero gradient (METRA's
``phi`` output bias cancels in ``phi(s') - phi(s)``); at eps 1e-8 Adam turns their float32 rounding noise
(~1e-9, different for a sum over 10 rows and a mean of two sums over 5) into steps of the learning rate. At
1e-4 that noise moves them by ~1e-8 per step, while real gradients (>= 1e-3 here) still take full steps."""


# ----------------------------------------------------------------------------------------- worker side
class GlobalDraws:
    """Within the block, the random draws of torch (``randn``, ``rand``, ``randperm``, distributions'
    standard normal) come from a generator seeded by ``(seed, call number)``; a draw whose first dim is the
    rank's ``local`` rows is taken from the draw of the ``world * local`` global rows at this rank's offset."""

    def __init__(self, rank: int, world: int, local: int, seed: int = 1234, multiples: tuple[int, ...] = (1,)):
        self.rank, self.world, self.local, self.seed, self.calls = rank, world, local, seed, 0
        self.multiples = multiples  # a first dim of m * local rows (flattened [b, m]) is the rank's block too
        import torch.distributions.normal as normal_module

        self._normal_module = normal_module
        self._saved = {}

    def _generator(self) -> torch.Generator:
        self.calls += 1
        return torch.Generator().manual_seed(self.seed * 100_003 + self.calls)

    def _rows(self, shape: tuple, make):
        g = self._generator()
        for m in self.multiples:
            if self.world > 1 and shape and shape[0] == m * self.local:
                n = m * self.local
                return make((self.world * n, *shape[1:]), g)[self.rank * n:(self.rank + 1) * n]
        return make(shape, g)

    def __enter__(self):
        orig_randn, orig_rand, orig_randperm = torch.randn, torch.rand, torch.randperm
        orig_randint = torch.randint
        self._saved = {"randn": orig_randn, "rand": orig_rand, "randperm": orig_randperm,
                       "randn_like": torch.randn_like, "randint": orig_randint,
                       "std": self._normal_module._standard_normal}

        def shape_of(args):
            return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)

        def randn(*args, **kw):
            kw.pop("generator", None)
            return self._rows(shape_of(args), lambda s, g: orig_randn(s, generator=g, **kw))

        def rand(*args, **kw):
            kw.pop("generator", None)
            return self._rows(shape_of(args), lambda s, g: orig_rand(s, generator=g, **kw))

        def randperm(n, **kw):
            kw.pop("generator", None)
            return orig_randperm(n, generator=self._generator(), **kw)

        def standard_normal(shape, dtype, device):
            return self._rows(tuple(shape), lambda s, g: orig_randn(s, generator=g, dtype=dtype).to(device))

        def randn_like(t, **kw):
            dtype, device = kw.get("dtype") or t.dtype, kw.get("device") or t.device
            return self._rows(tuple(t.shape), lambda s, g: orig_randn(s, generator=g, dtype=dtype).to(device))

        def randint(*args, size=None, **kw):  # randint(high, size) or randint(low, high, size)
            kw.pop("generator", None)
            device = kw.pop("device", None)
            bounds, size = (args[:-1], args[-1]) if size is None else (args, size)
            return self._rows(tuple(size), lambda s, g: orig_randint(*bounds, s, generator=g, **kw).to(device))

        torch.randn, torch.rand, torch.randperm = randn, rand, randperm
        torch.randn_like, torch.randint = randn_like, randint
        self._normal_module._standard_normal = standard_normal
        return self

    def __exit__(self, *exc):
        torch.randn, torch.rand, torch.randperm = self._saved["randn"], self._saved["rand"], self._saved["randperm"]
        torch.randn_like, torch.randint = self._saved["randn_like"], self._saved["randint"]
        self._normal_module._standard_normal = self._saved["std"]


def global_batches(agent_name: str, n: int, skill_dim: int = 2, seed: int = 7):
    """``n`` global replay batches ``[GLOBAL_BATCH]`` (states; METRA's with skills), the same in every process;
    slices ``[GLOBAL_BATCH, T]`` for the sequence agents (:func:`global_slices`)."""
    from tensordict import TensorDict

    from tests.fakes import ACTION_DIM, STATE_DIM

    if agent_name in ("pv_rnn", "stamo", "active_inference"):
        return global_slices(agent_name, n, seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = GLOBAL_BATCH
        td = {"state": 2.0 + 3.0 * torch.randn(b, STATE_DIM, generator=g),
              "action": torch.rand(b, ACTION_DIM, generator=g) * 2 - 1,
              "next": {"state": 2.0 + 3.0 * torch.randn(b, STATE_DIM, generator=g),
                       "terminated": torch.rand(b, 1, generator=g) < 0.1}}
        if agent_name == "metra":
            skill = torch.randn(b, skill_dim, generator=g)
            td["skill"] = skill / skill.norm(dim=-1, keepdim=True)
        out.append(TensorDict(td, batch_size=[b]))
    return out


def global_slices(agent_name: str, n: int, seed: int = 7):
    """``n`` global batches of slices ``[GLOBAL_BATCH, T]``, rows ``0..4`` rank 0's shard and ``5..9`` rank 1's.

    - PV-RNN (``T = 6``): offline shards, so rank ``r``'s segment ids are ``id % 2 == r``; two slices of a
      rank's shard share a segment with overlapping steps (an entry's gradient sums over both), segments recur
      in the next update (rows and moments reused) and 37 segments pass through a store of 16 rows (recycling).
    - StaMo (``T = 2``): action-labelled rows on one rank only (rank ``i % 2`` in update ``i``; none in update 4,
      every row in update 5): the probes' masked mean and statistics must count the global batch's labels.
    - Active inference (``T = 2``): every action recorded in updates 0-2 (only the free-nats clamp of the global
      mean matters), some of rank 1's missing in updates 3-5, their rewards NaN (the masked means' global counts
      matter too: the transition KL's and the reward head's).
    """
    from tensordict import TensorDict

    from tests.fakes import ACTION_DIM, STATE_DIM

    g = torch.Generator().manual_seed(seed)
    b, local = GLOBAL_BATCH, GLOBAL_BATCH // 2
    t_len = 6 if agent_name == "pv_rnn" else 2
    out = []
    for i in range(n):
        state = 2.0 + 3.0 * torch.randn(b, t_len + 1, STATE_DIM, generator=g)
        td = {"state": state[:, :-1], "action": torch.rand(b, t_len, ACTION_DIM, generator=g) * 2 - 1,
              "next": {"state": state[:, 1:], "reward": torch.randn(b, t_len, 1, generator=g),
                       "terminated": torch.zeros(b, t_len, 1, dtype=torch.bool)}}
        rank_of_row = torch.arange(b) // local
        if agent_name == "pv_rnn":
            segment = torch.tensor([0, 1, 1, 2, 3] * 2) + 3 * i
            td["segment_id"] = (2 * segment + rank_of_row).reshape(-1, 1).expand(b, t_len).clone()
            start = torch.tensor([0, 0, 2, 5, 1, 3, 0, 4, 2, 7])
            td["segment_step"] = start.reshape(-1, 1) + torch.arange(t_len)
            td["is_first"] = td["segment_step"] == 0
        elif agent_name == "stamo":
            if i < 4:  # 4 of the 5 rows of rank i % 2
                labelled = (rank_of_row == i % 2) & (torch.arange(b) % local != 1)
            else:  # no labelled row anywhere (4), every row labelled (5)
                labelled = torch.full((b,), i == 5)
            td["has_action"] = labelled.reshape(-1, 1).expand(b, t_len).clone()
        else:
            has_action = torch.ones(b, t_len, dtype=torch.bool)
            if i >= 3:
                has_action[local:] = torch.rand(local, t_len, generator=g) < 0.5
                td["next"]["reward"][local:][~has_action[local:]] = float("nan")  # reward-free steps on rank 1
            td["has_action"] = has_action
        out.append(TensorDict(td, batch_size=[b, t_len]))
    return out


def run_worker(agent_names: list[str], rank: int, world: int, port: int, out_dir: str, breakage: str) -> None:
    """For each agent in turn (one process start for all: importing the stack costs seconds), train ``UPDATES``
    updates on this rank's shard of the global batches and save the agent's state to ``worker_output``."""
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from latentrl.training import distributed

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LATENTRL_DIST_TIMEOUT="60")
        distributed.init_from_env()
    assert breakage == "none" or len(agent_names) == 1, "a breakage patches modules: one agent per process"
    for agent_name in agent_names:
        train_one(agent_name, rank, world, str(worker_output(Path(out_dir), agent_name, world, rank, breakage)),
                  breakage)
    distributed.shutdown()


def train_one(agent_name: str, rank: int, world: int, out: str, breakage: str) -> None:
    from latentrl.agents import make_agent
    from latentrl.training import distributed
    from latentrl.world_models import layers
    from tests.fakes import SpecEnv

    torch.manual_seed(100 + rank)  # ranks initialise differently: the broadcast must make them identical
    agent = make_agent(agent_name, SpecEnv(keys=("state",)), preset="smoke", **AGENT_OVERRIDES[agent_name])
    for opt in agent.optimizers().values():  # see ADAM_EPS
        for group in opt.param_groups:
            group["eps"] = ADAM_EPS
    distributed.broadcast_module(agent)
    averager = distributed.GradientAverager(agent.optimizers())
    if breakage == "no_average":
        averager.remove()
    if breakage == "no_gather":  # TD-JEPA's / FB's row-pairing terms on the rank's own rows only
        import latentrl.world_models.fb as fb_module
        import latentrl.world_models.td_jepa as td_jepa_module

        for module in (td_jepa_module, fb_module):
            module.gather_batch = lambda x, grad=False: x
            module.local_rows = lambda x: x
    if breakage == "local_normalizer":  # running statistics of the rank's own rows only
        layers.gather_batch = lambda x, grad=False: x
    if breakage in ("local_adaptive_grads", "local_delta_norm", "local_probe_mean"):  # on the rank's own rows
        from latentrl.agents.stamo import LatentActionProbe, StaMoAgent
        from latentrl.world_models.pv_rnn import AdaptiveVectors

        cls, method = {"local_adaptive_grads": (AdaptiveVectors, "adam_step"),  # rows still assigned globally
                       "local_delta_norm": (LatentActionProbe, "observe"),  # running stats still global
                       "local_probe_mean": (StaMoAgent, "probe_loss")}[breakage]  # probe stats still global
        rank_local = getattr(cls, method)

        def on_own_rows(self, *args, **kwargs):  # out of training mode: no gather (the stats keep theirs)
            self.training = False
            try:
                return rank_local(self, *args, **kwargs)
            finally:
                self.training = True

        setattr(cls, method, on_own_rows)
    if breakage == "no_world_scale":  # PV-RNN's summed loss not scaled by the world size
        import latentrl.agents.pv_rnn as pv_rnn_agent

        pv_rnn_agent.data_parallel_world_size = lambda: 1
    if breakage == "local_free_nats":  # in updates 0-2 (every action recorded): the clamp of each rank's own mean
        import latentrl.world_models.active_inference as active_inference_module

        global_gather = active_inference_module.gather_batch
        active_inference_module.gather_batch = lambda x, grad=False: x
    if breakage == "local_reward_mean":  # the reward head's masked mean over the rank's own rewarded rows
        import latentrl.agents.active_inference as active_inference_agent

        active_inference_agent.gather_batch = lambda x, grad=False: x
    local = GLOBAL_BATCH // world
    skill_dim = getattr(agent.config, "dim_option", 2)
    for i, batch in enumerate(global_batches(agent_name, UPDATES, skill_dim)):
        shard = batch[rank * local:(rank + 1) * local]
        if breakage == "local_free_nats" and i == 3:
            active_inference_module.gather_batch = global_gather
        with GlobalDraws(rank, world, local, seed=i, multiples=FLAT_ROWS.get(agent_name, (1,))):
            agent.update(shard)
        if breakage == "rank1_ema" and rank == 1 and agent_name == "td_jepa":  # an EMA target drifts on one rank
            with torch.no_grad():
                next(agent.world_model.targets.parameters()).add_(1e-3)
    state = {f"agent.{k}": v.clone() for k, v in agent.state_dict().items() if torch.is_tensor(v)}
    for name, opt in agent.optimizers().items():
        for i, per_param in opt.state_dict()["state"].items():
            for key, value in per_param.items():
                if torch.is_tensor(value) and value.numel() > 1:
                    state[f"optim.{name}.{i}.{key}"] = value.clone()
    torch.save(state, out)
    try:
        distributed.check_consistent(agent)
        consistent = "yes"
    except distributed.RankDivergedError as err:
        consistent = str(err)
    Path(out + ".json").write_text(json.dumps({"consistent": consistent}))


def run_gradient_worker(rank: int, world: int, port: int, out: str) -> None:
    """Parameters with a gradient on one rank only, on both, on none: what the averaging makes of them."""
    sys.path.insert(0, str(REPO))
    from latentrl.training import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LATENTRL_DIST_TIMEOUT="60")
    distributed.init_from_env()
    both, only_rank1, none = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    opt = torch.optim.SGD([both, only_rank1, none], lr=1.0)
    distributed.GradientAverager([opt])
    both.grad = torch.full((3,), float(rank + 1))  # 1 and 2: mean 1.5
    if rank == 1:
        only_rank1.grad = torch.full((3,), 4.0)  # rank 0 counts as 0: mean 2
    opt.step()
    # make_adam's clipping hook is installed before the averager's and must still run after it
    from latentrl.world_models.layers import make_adam

    clipped = torch.nn.Parameter(torch.zeros(2))
    clip_opt = make_adam([clipped], lr=0.1, max_grad_norm=2.0)
    distributed.GradientAverager([clip_opt])
    clipped.grad = torch.tensor([3.0, 0.0]) if rank == 0 else torch.tensor([-3.0, 8.0])  # mean (0, 4), norm 4
    clip_opt.step()
    torch.save({"both": both.grad, "only_rank1": only_rank1.grad, "none": none.grad, "clipped": clipped.grad}, out)
    distributed.shutdown()


# ------------------------------------------------------------------------------------------ test side
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra)
    return env


def worker_output(tmp: Path, agent_name: str, world: int, rank: int, breakage: str = "none") -> Path:
    return tmp / f"{agent_name}-w{world}-r{rank}-{breakage}.pt"


def run_workers(agent_names: list[str], world: int, tmp: Path, breakage: str = "none") -> None:
    """``world`` worker processes, each training every agent of ``agent_names`` in turn; states in ``tmp``."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "worker", ",".join(agent_names), str(r), str(world),
                               str(port), str(tmp), breakage], env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=240 * len(agent_names))[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


def two_ranks(agent_name: str, tmp: Path, breakage: str = "none") -> tuple[dict, dict]:
    run_workers([agent_name], 2, tmp, breakage)
    return tuple(torch.load(worker_output(tmp, agent_name, 2, r, breakage)) for r in range(2))


def max_difference(a: dict, b: dict, *, integers_equal: bool = True) -> tuple[float, str]:
    """The largest difference of the floating tensors of two saved states, and its key; integer tensors (PV-RNN's
    row -> segment map and per-entry step counts) must be equal."""
    assert a.keys() == b.keys()
    for k in a:
        assert not integers_equal or a[k].is_floating_point() or torch.equal(a[k], b[k]), f"{k} differs"
    worst = max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a if a[k].is_floating_point())
    return worst


class SingleProcessStates(dict):
    """Agent name -> the state one process saves after ``UPDATES`` updates on the global batches (run on demand)."""

    def __init__(self, tmp: Path):
        super().__init__()
        self.tmp = tmp

    def __missing__(self, agent_name: str) -> dict:
        run_workers([agent_name], 1, self.tmp)
        self[agent_name] = torch.load(worker_output(self.tmp, agent_name, 1, 0))
        return self[agent_name]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return SingleProcessStates(tmp_path_factory.mktemp("single"))


AGENTS = ["td_jepa", "metra", "fb", "pv_rnn", "stamo", "active_inference"]


@pytest.fixture(scope="module")
def every_agent_two_ranks(single_process, tmp_path_factory) -> Path:
    """Every agent trained by one process and by 2 gloo ranks: one launch of each for all six agents (starting a
    process costs seconds of imports); the states lie in the returned folder."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    run_workers(AGENTS, 1, single_process.tmp)
    single_process.update({a: torch.load(worker_output(single_process.tmp, a, 1, 0)) for a in AGENTS})
    run_workers(AGENTS, 2, tmp)
    return tmp


@pytest.mark.parametrize("agent_name", AGENTS)
def test_two_gloo_ranks_equal_one_process(agent_name, single_process, every_agent_two_ranks):
    """2 ranks x 5 rows == 1 process x 10 rows after 6 updates: parameters, EMA targets, normaliser
    statistics, Adam moments, PV-RNN's adaptive-vector store and StaMo's probe statistics within 1e-5 (integer
    state equal); the two ranks bitwise identical."""
    rank0, rank1 = (torch.load(worker_output(every_agent_two_ranks, agent_name, 2, r)) for r in range(2))
    diff, key = max_difference(single_process[agent_name], rank0)
    assert diff < 1e-5, f"{agent_name}: rank 0 differs from one process by {diff:.2e} in {key}"
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"ranks differ in {k}"
    moved = max_difference(single_process[agent_name], {k: torch.zeros_like(v) for k, v in rank0.items()},
                           integers_equal=False)
    assert moved[0] > 0
    if agent_name == "metra":  # the normaliser folded the global batches: not the identity any more
        assert not torch.allclose(rank0["agent.world_model.normalizer.rms.mean"], torch.zeros(24))
    if agent_name == "pv_rnn":  # the store is full and recycled rows (16 rows, ids up to 37); entries stepped twice
        ids = rank0["agent.adaptive_vectors.segment_ids"]
        assert bool((ids >= 0).all()) and int(ids.max()) > 16 and int(rank0["agent.adaptive_vectors.updates"].max()) > 1
    if agent_name == "stamo":  # the probes' statistics counted every labelled row of the global batches
        assert int(rank0["agent.probes.1.seen"]) == 4 * 4 + GLOBAL_BATCH


@pytest.mark.slow
@pytest.mark.parametrize("agent_name,breakage", [("pv_rnn", "local_adaptive_grads"), ("pv_rnn", "no_world_scale"),
                                                 ("stamo", "local_delta_norm"), ("stamo", "local_probe_mean"),
                                                 ("active_inference", "local_free_nats"),
                                                 ("active_inference", "local_reward_mean")])
def test_equality_test_catches_sequence_agent_breakages(agent_name, breakage, single_process, tmp_path):
    """PV-RNN's adaptive-vector step on the rank's own entries, its summed loss unscaled; StaMo's delta_norm
    or probe mean over the rank's own rows; active inference's free nats clamping the rank's own KL mean: each
    makes rank 0 differ from one process, or the ranks differ."""
    test_equality_test_catches_breakages(agent_name, breakage, single_process, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("agent_name,breakage", [("td_jepa", "no_average"), ("td_jepa", "no_gather"),
                                                 ("metra", "no_average"), ("metra", "local_normalizer"),
                                                 ("td_jepa", "rank1_ema"), ("fb", "no_gather")])
def test_equality_test_catches_breakages(agent_name, breakage, single_process, tmp_path):
    """Each way of breaking data parallelism makes rank 0 differ from one process, or the ranks differ
    (and check_consistent says which tensor)."""
    rank0, rank1 = two_ranks(agent_name, tmp_path, breakage)
    single = single_process[agent_name]
    diff, _ = max_difference(single, rank0, integers_equal=False)
    integers_equal = all(v.is_floating_point() or torch.equal(v, single[k]) for k, v in rank0.items())
    ranks_equal = all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert diff > 1e-5 or not integers_equal or not ranks_equal, \
        f"{breakage} went unnoticed: rank 0 within {diff:.1e} of one process"
    if breakage == "rank1_ema":
        report = json.loads(Path(str(tmp_path / f"{agent_name}-w2-r0-{breakage}.pt") + ".json").read_text())
        assert "world_model.targets" in report["consistent"] and "rank(s) 1" in report["consistent"]


def test_gradient_averaging_with_missing_gradients(tmp_path):
    """A gradient missing on one rank takes part as zeros (the collectives match) and the average is set on
    every rank; a parameter without a gradient anywhere keeps none (Adam then skips it on every rank).
    make_adam's gradient clipping sees the averaged gradient, though its hook was installed first."""
    port = free_port()
    outs = [tmp_path / f"grad{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, "gradients", str(r), "2", str(port), str(outs[r])],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        log = p.communicate(timeout=120)[0]
        assert p.returncode == 0, log[-3000:]
    for out in outs:
        grads = torch.load(out)
        assert torch.equal(grads["both"], torch.full((3,), 1.5))
        assert torch.equal(grads["only_rank1"], torch.full((3,), 2.0))
        assert grads["none"] is None
        # clipped after averaging: (0, 4) -> (0, 2) on both ranks (each rank clipping its own first: (0.65, 0.94))
        torch.testing.assert_close(grads["clipped"], torch.tensor([0.0, 2.0]))


def test_shard_spec_and_episode_shards(tmp_path):
    """Each rank samples batch_size / world_size rows, only from episodes id % world_size == rank."""
    from tensordict import TensorDict

    from latentrl.agents.base import SampleSpec
    from latentrl.replay import ReplayBuffer
    from latentrl.training.distributed import shard_spec

    assert shard_spec(SampleSpec(batch_size=12), 3).batch_size == 4
    assert shard_spec({"a": SampleSpec(batch_size=8)}, 2)["a"].batch_size == 4
    with pytest.raises(ValueError, match="agent.batch_size=10 does not split over 4 .*agent.batch_size=8"):
        shard_spec(SampleSpec(batch_size=10), 4)

    steps = 60  # 6 episodes of 10 steps, one stream
    done = (torch.arange(steps) % 10 == 9).reshape(-1, 1)
    td = TensorDict({"state": torch.arange(steps, dtype=torch.float32).reshape(-1, 1), "action": torch.zeros(steps, 1),
                     "next": {"state": torch.arange(1, steps + 1, dtype=torch.float32).reshape(-1, 1),
                              "reward": torch.zeros(steps, 1), "done": done, "terminated": done,
                              "truncated": torch.zeros(steps, 1, dtype=torch.bool)}}, batch_size=[steps])
    buffer = ReplayBuffer.from_dataset(td)
    assert buffer.episodes()["id"].tolist() == list(range(6))
    for rank in range(3):
        buffer.shard_episodes(rank, 3)
        ids = buffer.sample(200)["segment_id"]
        assert set(ids.tolist()) == {rank, rank + 3}
    buffer.shard_episodes(0, 1)
    assert set(buffer.sample(300)["segment_id"].tolist()) == set(range(6))
    with pytest.raises(ValueError, match="none of them in shard 7 of 8"):
        buffer.shard_episodes(7, 8)
    with pytest.raises(ValueError, match="0 <= index < count"):
        buffer.shard_episodes(3, 3)

    # online ranks number their own episodes apart: rank 1 of 3 gives ids 1, 4, 7, ..., kept through a checkpoint
    numbered = ReplayBuffer(200)
    numbered.number_episodes(1, 3)
    numbered.extend(td[:30].unsqueeze(0))
    assert numbered.episodes()["id"].tolist() == [1, 4, 7]
    restored = ReplayBuffer(200)
    restored.load_state_dict(numbered.state_dict())
    restored.extend(td[30:].unsqueeze(0))
    assert restored.episodes()["id"].tolist() == [1, 4, 7, 10, 13, 16]
    assert set(restored.sample(100)["segment_id"].tolist()) == {1, 4, 7, 10, 13, 16}
    with pytest.raises(RuntimeError, match="empty buffer"):
        restored.number_episodes(0, 3)


# -------------------------------------------------------------------------------------- train_agent.py
TRAIN = [str(REPO / "scripts" / "train_agent.py"), "preset=smoke", "log.progress=false", "log.tensorboard=false",
         "eval.video=false", "threads=1"]


def torchrun(*args: str, nproc: int = 2, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun_bin), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *TRAIN, *args]
    return subprocess.run(cmd, env=child_env(LATENTRL_DIST_TIMEOUT="60", **env), capture_output=True, text=True,
                          timeout=timeout)


def test_killed_rank_stops_the_job_and_resume_continues(walker_dataset, tmp_path):
    """torchrun, TD-JEPA offline on 2 processes: rank 1 killed in update 8 (os._exit, no cleanup) stops the job
    with torchrun's report naming rank 1; rank 0 alone wrote the run's files (rank 1 only its resume state);
    resume=true continues from the update-4 checkpoint to the end; a resume in one process re-shards."""
    run = tmp_path / "run"
    args = ["agent=td_jepa", f"data={walker_dataset}", "env.obs=[state,physics]", "steps=12", "checkpoint_every=4",
            "log.every=4", "eval.every=0", "eval.at_end=false", f"run_dir={run}"]
    # TD-JEPA has 5 optimizers: the 40th gradient averaging is the last step of update 8
    killed = torchrun(*args, LATENTRL_FAULT_INJECT="1:40")
    out = killed.stdout + killed.stderr
    assert killed.returncode != 0
    assert "rank 1 exits now" in out
    root_cause = out[out.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : 1" in root_cause
    payload = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert payload["counters"]["updates"] == 4 and payload["config"]["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt", "rank1-000000004.pt"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv", "model"]
    assert [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]] == [4]

    resumed = torchrun(*args, "resume=true")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert resumed.stdout.count("resumed from") == 2 and "update 4" in resumed.stdout  # both ranks, once each
    payload = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert payload["counters"]["updates"] == 12
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt", "rank1-000000012.pt"]
    assert [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]] == [4, 8, 12]

    longer = [a for a in args if not a.startswith("steps=")] + ["steps=14", "resume=true"]
    one = subprocess.run([sys.executable, *TRAIN, *longer], env=child_env(), capture_output=True, text=True,
                         timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "re-sharded by episode" in one.stdout
    assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["config"]["world_size"] == 1


def test_pv_rnn_and_stamo_train_under_torchrun_offline_and_pv_rnn_online(walker_dataset, tmp_path):
    """torchrun, 2 processes: PV-RNN and StaMo train offline to the end, through checkpoints whose
    check_consistent finds every parameter and buffer (adaptive-vector store, probe statistics) identical on the
    ranks under each rank's own random draws; PV-RNN online too, its ranks' buffers numbering their episodes
    apart (rank 0 even ids, rank 1 odd), so one adaptive-vector row never serves two ranks' episodes."""
    common = ["steps=4", "checkpoint_every=2", "log.every=2", "eval.every=0", "eval.at_end=false"]
    for agent, obs in (("pv_rnn", "state"), ("stamo", "pixels")):
        extra = ["agent.max_steps=160"] if agent == "pv_rnn" else []  # the walker episodes' length
        run = torchrun(f"agent={agent}", *extra, f"data={walker_dataset}", f"env.obs=[{obs}]", *common,
                       f"run_dir={tmp_path / agent}")
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        assert torch.load(tmp_path / agent / "checkpoints" / "latest.pt", weights_only=True)["counters"]["updates"] == 4
    run = tmp_path / "online"
    online = torchrun("agent=pv_rnn", "env.obs=[state]", "agent.max_steps=40", "env.episode_length=40", "steps=200",
                      "learning_starts=160", "checkpoint_every=100", "log.every=100", "eval.every=0",
                      "eval.at_end=false", f"run_dir={run}")
    assert online.returncode == 0, (online.stdout + online.stderr)[-3000:]
    states = {0: torch.load(run / "checkpoints" / "latest.pt", weights_only=True),
              1: torch.load(run / "checkpoints" / "rank1-000000200.pt", weights_only=True)}
    for rank, state in states.items():
        layout = state["buffer"]["layout"]
        ids = torch.unique(state["buffer"]["storage"]["_replay"]["segment"])
        ids = ids[ids >= 0]
        assert len(ids) >= 2 and bool((ids % 2 == rank).all()), (rank, ids)
        assert layout["segment_stride"] == 2
    assert states[0]["counters"]["updates"] > 0


def test_surviving_rank_names_the_failed_one(walker_dataset, tmp_path):
    """Without torchrun's agent (which stops the others at once), the surviving rank's collective fails and its
    error names the rank that vanished and how to resume."""
    port = free_port()
    args = ["agent=td_jepa", f"data={walker_dataset}", "env.obs=[state,physics]", "steps=12", "checkpoint_every=4",
            "eval.every=0", "eval.at_end=false", f"run_dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen([sys.executable, *TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                                                       LOCAL_RANK=str(r), WORLD_SIZE="2", LATENTRL_DIST_TIMEOUT="60",
                                                       LATENTRL_FAULT_INJECT="1:20"))
             for r in range(2)]
    (_, err0), _ = (p.communicate(timeout=240) for p in procs)
    assert procs[0].returncode == 1 and procs[1].returncode == 1
    assert "error: rank 1 failed: it stopped without reporting an error" in err0
    assert f"resume=true run_dir={tmp_path / 'run'}" in err0


def test_online_resume_with_another_world_size_is_refused(tmp_path):
    """Each rank's envs and replay buffer are its own: an online run of 1 process resumed by 2 is refused with
    both sizes and the command that works."""
    run = tmp_path / "run"
    args = ["agent=metra", "steps=120", "learning_starts=100", "checkpoint_every=0", "eval.every=0",
            "eval.at_end=false", f"run_dir={run}"]
    first = subprocess.run([sys.executable, *TRAIN, *args], env=child_env(), capture_output=True, text=True,
                           timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    refused = torchrun(*args[:-1], "steps=140", f"run_dir={run}", "resume=true")
    assert refused.returncode != 0
    assert ("cannot resume" in refused.stderr and "with 2 process(es): the online run was trained by 1"
            in refused.stderr and "without torchrun" in refused.stderr)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "gradients":
    run_gradient_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _, _, names, rank_, world_, port_, out_dir_, breakage_ = sys.argv
    run_worker(names.split(","), int(rank_), int(world_), int(port_), out_dir_, breakage_)
