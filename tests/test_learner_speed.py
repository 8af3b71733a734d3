"""The learner's speed-ups change no maths (issue 19): updates with and without each of them give the same
parameters, exactly for those on by default, within rounding for the opt-ins; updates leave their metrics on the
device and the trainer reads them once per log row, still stopping at the first non-finite update.

- ``make_adam``: on the CPU the default (``foreach``) gives bit-for-bit the parameters of a plain
  ``torch.optim.Adam(foreach=False)`` after N updates of METRA, TD-JEPA and FB; the opt-in fused Adam within 1e-4.
- metrics: ``update`` returns detached 0-dim float32 tensors and reads no tensor on the host (METRA, TD-JEPA, FB,
  RND); :class:`PendingMetrics` finds a NaN at its update among many, with the batch's non-finite inputs.
- channels_last (pixel encoders), ``torch.compile`` of the networks and bf16 autocast: opt-ins, compared with the
  plain update after N updates (compile is tiny and marked slow: it compiles for a minute on a CPU).
GPU paths (fused Adam and CUDA graphs on CUDA) are checked where a GPU is present and skip otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_conformance import fixture_buffer

from latentrl.agents import agent_class
from latentrl.agents.base import sample_batches
from latentrl.training.trainer import NonFiniteLossError, PendingMetrics, learner_options
from latentrl.world_models.encoders import DreamerEncoder, DrQEncoder, set_channels_last
from latentrl.world_models.layers import adam_implementation, compile_networks, make_adam

from fakes import ACTION_DIM, STATE_DIM

ROOT = Path(__file__).resolve().parents[1]
OBS_SHAPE = {"pixels": (3, 64, 64), "state": (STATE_DIM,)}
NUM_UPDATES = 5


def _agent(name: str, obs_type: str, *, seed: int = 0, adam: str = "auto", **overrides):
    cls = agent_class(name)
    torch.manual_seed(seed)
    with adam_implementation(adam):
        return cls(cls.make_config("smoke", obs_type=obs_type, **overrides), OBS_SHAPE[obs_type], ACTION_DIM,
                   device="cpu")


def _batches(agent, obs_type: str, n: int = 3):
    buffer = fixture_buffer(agent, obs_type)
    torch.manual_seed(7)
    return [sample_batches(buffer, agent.sample_spec()) for _ in range(n)]


def _train(agent, batches, updates: int = NUM_UPDATES, *, amp: bool = False) -> list[dict[str, float]]:
    torch.manual_seed(11)
    out = []
    for k in range(updates):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            metrics = agent.update(batches[k % len(batches)].clone())
        out.append({key: float(v) for key, v in metrics.items()})
    return out


def _max_param_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())


def _plain_adams(agent) -> None:
    """Replace the agent's optimizers by plain ``torch.optim.Adam(foreach=False)`` over the same groups."""
    for name, opt in list(agent._optimizers.items()):
        groups = [{"params": g["params"], "lr": g["lr"]} for g in opt.param_groups]
        agent._optimizers[name] = torch.optim.Adam(groups, foreach=False)


ADAM_CASES = [("metra", "pixels"), ("metra", "state"), ("td_jepa", "pixels"), ("td_jepa", "state"), ("fb", "state")]


# ------------------------------------------------------------------------------------------------------ Adam
def test_make_adam_picks_an_exact_implementation_on_the_cpu():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(()))]
    default = make_adam(params, lr=1e-3)
    assert type(default) is torch.optim.Adam and default.defaults["foreach"] is True and not default.defaults["fused"]
    assert make_adam(params, lr=1e-3, impl="fused").defaults["fused"] is True
    assert make_adam(params, lr=1e-3, impl="loop").defaults["foreach"] is False
    adamw = make_adam(params, lr=1e-3, decoupled_weight_decay=True, weight_decay=0.1, betas=(0.9, 0.95))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.9, 0.95)
    with adam_implementation("fused"):
        assert make_adam(params, lr=1e-3).defaults["fused"] is True
    assert make_adam(params, lr=1e-3).defaults["foreach"] is True  # restored after the block
    with pytest.raises(ValueError, match="auto, fused, foreach, loop"):
        make_adam(params, lr=1e-3, impl="sgd")


def test_make_adam_clips_the_global_gradient_norm_before_each_step():
    """``max_grad_norm``: every ``step()`` is ``clip_grad_norm_`` over all the optimizer's gradients, then Adam,
    with gradients whose norms cross the bound both ways (Adam's first step is scale-free, so several steps with
    other norms are what shows clipping). The active inference agent passes its ``max_grad_norm`` on."""
    torch.manual_seed(0)
    init = [torch.randn(3, 4), torch.randn(2)]
    grads = [[torch.randn(3, 4) * scale, torch.randn(2) * scale] for scale in (0.1, 10.0, 3.0, 0.5, 20.0)]

    def run(max_norm, reference_clip):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = make_adam(params, lr=0.1, max_grad_norm=max_norm)
        for g in grads:
            for p, gp in zip(params, g, strict=True):
                p.grad = gp.clone()
            if reference_clip:
                torch.nn.utils.clip_grad_norm_(params, 2.0)
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in params])

    clipped, reference, unclipped = run(2.0, False), run(None, True), run(None, False)
    torch.testing.assert_close(clipped, reference, rtol=0, atol=1e-6)
    assert (clipped - unclipped).abs().max() > 1e-3
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_adam(init, lr=1e-3, max_grad_norm=0.0)
    agent = _agent("active_inference", "state", max_grad_norm=5.0)
    hooks = list(agent.optimizers()["model"]._optimizer_step_pre_hooks.values())
    assert [h.max_norm for h in hooks] == [5.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_make_adam_is_fused_on_cuda():
    params = [torch.nn.Parameter(torch.randn(3, 4, device="cuda"))]
    assert make_adam(params, lr=1e-3).defaults["fused"] is True


@pytest.mark.parametrize(("name", "obs_type"), ADAM_CASES, ids=[f"{n}-{o}" for n, o in ADAM_CASES])
def test_helper_adam_equals_plain_adam_after_n_updates(name, obs_type):
    """The default (foreach on the CPU): bit-for-bit; the opt-in fused Adam: within rounding (1e-4)."""
    helper = _agent(name, obs_type)
    assert all(o.defaults["foreach"] for o in helper._optimizers.values())
    plain = _agent(name, obs_type)
    _plain_adams(plain)
    fused = _agent(name, obs_type, adam="fused")
    assert all(o.defaults["fused"] for o in fused._optimizers.values())
    batches = _batches(helper, obs_type)
    metrics = [_train(a, batches) for a in (helper, plain, fused)]
    assert _max_param_diff(helper, plain) == 0.0
    assert metrics[0] == metrics[1]
    # fused rounds differently (about one ulp per step); Adam's normalisation of near-zero gradients lifts that to
    # about 1e-5 after 5 steps in the smoke networks
    assert _max_param_diff(fused, plain) <= 1e-4
    assert _max_param_diff(helper, _agent(name, obs_type)) > 1e-4  # the updates did move the parameters


# ------------------------------------------------------------------------------------------- metrics, no syncs
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


class HostReads:
    """Counts the tensor reads to the host (``.item()``, ``.tolist()``, ``int()``, ``float()``, ``bool()``, or
    ``names``) made by latentrl's own code inside the block, and by the code of ``libraries`` (e.g. ``"torchrl"``);
    torch's CPU-side optimizer bookkeeping and ``skip`` are not counted, nor anything while ``paused``."""

    def __init__(self, skip=(), names=HOST_READS, libraries=(), pausable=False):
        self.calls: list[str] = []
        self.skip = [id(t) for t in skip]
        self.names = names
        self.libraries = [f"/{name}/" for name in libraries]
        self.paused = False

    def _counted(self, filename: str) -> bool:
        ours = str(ROOT) in filename and "/tests/" not in filename
        return ours or any(lib in filename for lib in self.libraries)

    def __enter__(self):
        import traceback

        self.saved = {name: getattr(torch.Tensor, name) for name in self.names}

        def wrap(name, original):
            def read(tensor, *args, **kwargs):
                if not self.paused and id(tensor) not in self.skip:
                    caller = traceback.extract_stack(limit=2)[0]
                    if self._counted(caller.filename):
                        self.calls.append(f"{name} at {caller.filename}:{caller.lineno}: {caller.line}")
                return original(tensor, *args, **kwargs)
            return read

        for name, original in self.saved.items():
            setattr(torch.Tensor, name, wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


SYNC_FREE = [("metra", "pixels", {}), ("metra", "state", {"obs_normalizer_warmup": 2}), ("td_jepa", "pixels", {}),
             ("td_jepa", "state", {}), ("fb", "state", {}), ("rnd", "pixels", {}), ("rnd", "state", {}),
             ("active_inference", "pixels", {})]


def test_active_inference_reward_loss_is_the_mean_over_rows_with_a_reward():
    """The reward head's loss, masked instead of selected (no host read): the mean over the rows whose reward is
    finite (NaN marks reward-free steps), 0 with a zero head gradient when a batch has none."""
    agent = _agent("active_inference", "pixels")
    batch = _batches(agent, "pixels")[0].clone()
    reward = batch["next", "reward"]
    reward.view(-1)[::3] = float("nan")
    finite = torch.isfinite(reward).reshape(-1)
    x_next = batch["next", "pixels"]
    with torch.no_grad():
        s = agent.world_model.posterior(x_next.reshape(-1, *x_next.shape[2:]))[0]
        expected = (agent.reward_head(s).reshape(-1)[finite] - reward.reshape(-1)[finite]).square().mean()
    metrics = agent.update(batch)
    assert torch.allclose(metrics["reward_loss"], expected, rtol=1e-6, atol=0)
    batch = _batches(agent, "pixels")[1].clone()
    batch["next", "reward"].fill_(float("nan"))
    metrics = agent.update(batch)
    assert float(metrics["reward_loss"]) == 0.0 and all(torch.isfinite(v) for v in metrics.values())
    assert all(p.grad is None or not p.grad.any() for p in agent.reward_head.parameters())


@pytest.mark.parametrize(("name", "obs_type", "overrides"), SYNC_FREE, ids=[f"{n}-{o}" for n, o, _ in SYNC_FREE])
def test_update_returns_device_tensors_and_reads_nothing_on_the_host(name, obs_type, overrides):
    agent = _agent(name, obs_type, **overrides)
    batches = _batches(agent, obs_type)
    _train(agent, batches, updates=3)  # past METRA's normaliser warm-up (2 batches here)
    with HostReads(skip=[agent.env_steps_counter]) as reads:  # the step counter lives on the CPU by design
        metrics = agent.update(batches[0].clone())
    assert reads.calls == []
    assert metrics and all(torch.is_tensor(v) and v.shape == () and v.dtype == torch.float32 and not v.requires_grad
                           and v.device == agent.device for v in metrics.values())


def test_returned_metrics_do_not_follow_later_updates():
    """RND reports its running statistics; the returned values are copies, not views that later updates change."""
    agent = _agent("rnd", "state")
    batches = _batches(agent, "state")
    first = agent.update(batches[0].clone())
    saved = {k: v.clone() for k, v in first.items()}
    agent.update(batches[1].clone())
    assert all(torch.equal(first[k], saved[k]) for k in first)


def test_pending_metrics_stop_at_the_first_non_finite_update():
    from tensordict import TensorDict

    pending = PendingMetrics(torch.device("cpu"))
    clean = TensorDict({"state": torch.zeros(4, 3), "next": {"reward": torch.full((4, 1), math.nan)}}, [4])
    damaged = clean.clone()
    damaged["state"][1, 2] = math.inf
    for update in range(1, 6):
        loss = torch.tensor(math.nan if update in (3, 5) else float(update))
        pending.append(update, 10 * update, {"loss": loss, "q": torch.tensor(1.0)}, damaged if update == 3 else clean)
    with pytest.raises(NonFiniteLossError, match=r"update 3 \(env step 30\): loss=nan.*non-finite observations: "
                                                 r"state \(1 values\)"):
        pending.read()
    assert len(pending) == 0
    for update in (6, 7):  # finite: the last update's values, floats
        pending.append(update, 0, {"loss": torch.tensor(float(update)), "alpha": 0.5}, clean)
    assert pending.read() == {"loss": 7.0, "alpha": 0.5}
    assert pending.read() == {}


def test_learner_options_are_checked():
    from omegaconf import OmegaConf

    assert learner_options(OmegaConf.create({})) == {"adam": "auto", "channels_last": "auto", "compile": False,
                                                     "amp": None}
    cfg = OmegaConf.create({"learner": {"adam": "fused", "channels_last": True, "compile": "true", "amp": "bf16"}})
    assert learner_options(cfg) == {"adam": "fused", "channels_last": True, "compile": True, "amp": "bf16"}
    for bad, named in [({"amp": "fp16"}, "bf16"), ({"adam": "sgd"}, "fused"), ({"compile": 1}, "reduce-overhead"),
                       ({"speed": True}, "valid: adam")]:
        with pytest.raises(ValueError, match=named):
            learner_options(OmegaConf.create({"learner": bad}))


# ---------------------------------------------------------------------------------------------- the opt-ins
def test_channels_last_defaults_and_equivalence():
    """Dreamer's CNN (METRA) runs NHWC by default, DrQ (TD-JEPA, FB, RND) does not; either way N updates agree with
    the other layout to rounding, and the switch reaches every pixel encoder of an agent."""
    assert DreamerEncoder.channels_last and not DrQEncoder.channels_last
    for name in ("metra", "td_jepa"):
        nhwc, nchw = _agent(name, "pixels"), _agent(name, "pixels")
        assert set_channels_last(nhwc, True) >= 2 and set_channels_last(nchw, False) >= 2
        batches = _batches(nhwc, "pixels")
        _train(nhwc, batches)
        _train(nchw, batches)
        # rounding (1e-7 per conv), lifted by Adam as for fused: in near-zero gradients up to a step per update for
        # a few parameters; DrQ's trunk on an AVX2-only CPU (oneDNN's other kernels) measured 4.2e-4 (2026-12-04)
        assert _max_param_diff(nhwc, nchw) <= 1e-3, name
        x = torch.randint(0, 256, (2, 9, 64, 64), dtype=torch.uint8)
        enc = next(m for m in nhwc.modules() if isinstance(m, (DrQEncoder, DreamerEncoder)))
        assert enc(x).shape == (2, enc.repr_dim)


BF16_CASES = [("td_jepa", "state", "total_loss"), ("metra", "state", "phi_loss"), ("fb", "state", "total_loss"),
              ("rnd", "pixels", "rnd_loss")]


@pytest.mark.parametrize(("name", "obs_type", "loss"), BF16_CASES, ids=[f"{n}-{o}" for n, o, _ in BF16_CASES])
def test_bf16_autocast_keeps_fp32_parameters_and_close_losses(name, obs_type, loss):
    fp32, bf16 = _agent(name, obs_type), _agent(name, obs_type)
    batches = _batches(fp32, obs_type)
    want = _train(fp32, batches, updates=3)
    got = _train(bf16, batches, updates=3, amp=True)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(o.state[p]["exp_avg"].dtype == torch.float32 for o in bf16._optimizers.values()
               for g in o.param_groups for p in g["params"] if p in o.state)
    assert all(math.isfinite(v) for m in got for v in m.values())
    # bf16 keeps 8 bits of mantissa: the world model's loss of the first update agrees to about 1e-2 relative
    assert got[0][loss] == pytest.approx(want[0][loss], rel=5e-2, abs=5e-2)
    assert got[0][loss] != want[0][loss]  # autocast did run in bf16


@pytest.mark.slow
def test_compiled_networks_give_the_same_parameters():
    """``learner.compile``: the compiled networks keep their state-dict keys, and N updates of a tiny TD-JEPA agent
    agree with the eager ones within rounding (CPU: inductor's default mode)."""
    eager, compiled = _agent("td_jepa", "state"), _agent("td_jepa", "state")
    keys = list(compiled.state_dict())
    names = compile_networks(compiled)
    assert names and list(compiled.state_dict()) == keys
    batches = _batches(eager, "state")
    _train(eager, batches, updates=3)
    _train(compiled, batches, updates=3)
    assert _max_param_diff(eager, compiled) <= 1e-5


def test_trainer_applies_the_learner_options(tmp_path, walker_dataset, monkeypatch):
    """``learner.*`` from the command line reach the agent: fused Adams, NHWC encoders, updates under bf16 autocast;
    metrics are logged as floats at each log row."""
    import csv

    from latentrl.agents.rnd import RNDAgent
    from latentrl.training.cli import train_main

    seen = []
    original = RNDAgent.update

    def update(self, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     all(o.defaults["fused"] for o in self._optimizers.values()),
                     all(m.channels_last for m in self.modules() if isinstance(m, DrQEncoder))))
        return original(self, batch)

    monkeypatch.setattr(RNDAgent, "update", update)
    run_dir = tmp_path / "run"
    train_main(["preset=smoke", "log.progress=false", "log.tensorboard=false", f"data={walker_dataset}", "steps=12",
                "env.obs=[pixels,state,physics]", "agent.obs_type=pixels", "log.every=4", "eval.every=0",
                "eval.at_end=false", "learner.adam=fused", "learner.channels_last=true", "learner.amp=bf16",
                f"run_dir={run_dir}"])
    assert seen and all(s == (True, torch.bfloat16, True, True) for s in seen)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("critic_loss")]
    assert [int(float(r["step"])) for r in rows] == [4, 8, 12]
    assert all(math.isfinite(float(r["critic_loss"])) for r in rows)


def test_bench_learner_writes_its_page(tmp_path):
    """scripts/bench_learner.py end to end at the smoke preset: rows per variant in fresh processes, the same-process
    A/B, the bf16 loss table, and a page built from both results files."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_learner", ROOT / "scripts" / "bench_learner.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = ["--preset", "smoke", "--agents", "td_jepa:state", "--threads", "1", "--warmup", "1", "--min-blocks", "1",
              "--max-seconds", "0"]
    rows, ab = tmp_path / "rows.json", tmp_path / "ab.json"
    bench.main([*common, "--variants", "on", "bf16", "--json", str(rows), "--out", str(tmp_path / "rows.md")])
    bench.main([*common, "--ab", "off", "on", "fast", "--json", str(ab)])
    done = json.loads(rows.read_text())["rows"]
    assert [r.get("variant") for r in done] == ["on", "bf16"] and not any("error" in r for r in done)
    assert all(r["updates_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["metrics"] for r in done)
    (pair,) = json.loads(ab.read_text())["rows"]
    assert pair["variants"] == ["off", "on", "fast"] and pair["ratio_vs_first"]["off"] == 1.0
    page = tmp_path / "page.md"
    bench.main(["--from-json", str(rows), str(ab), "--out", str(page)])
    text = page.read_text()
    assert "| td_jepa state | smoke (32) | 1 | on |" in text and "Same-process A/B" in text
    assert "bf16 autocast: losses after the same updates" in text and "| td_jepa state | phi_loss |" in text
