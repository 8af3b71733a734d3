"""PV-RNN (issue 15; spec ``shared/algorithms/pv_rnn.md`` §13): the KL against its closed form, the
meta-prior weighting, adaptive vectors alone fitting one sequence, per-row independence of the adaptive
vectors, checkpoints of the adaptive-vector store, error regression (only the window moves; it lowers
the window and one-step errors against prior-only prediction), GLean planning (goal-only accuracy,
masks), the policy's sliding window and PD control."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from latentrl.agents import GoalObservation, RewardSamples, UnsupportedTaskError
from latentrl.agents.pv_rnn import PVRNNAgent, PVRNNPolicy, branch_side, branching_paths, pd_control
from latentrl.replay import ReplayBuffer
from latentrl.world_models.pv_rnn import AdaptiveVectors, PVRNNModel, gaussian_kl_log_sigma


def model(meta_prior=(0.01, 0.005), w1=(0.01, 0.01), x_dim=2, seed=0, **kw) -> PVRNNModel:
    torch.manual_seed(seed)
    return PVRNNModel("state", (x_dim,), d_sizes=kw.pop("d_sizes", [20, 10]), z_sizes=kw.pop("z_sizes", [2, 1]),
                      taus=kw.pop("taus", [4.0, 8.0]), meta_prior=meta_prior, w1=w1, **kw)


# ----------------------------------------------------------------------------------------- 13.1


def test_kl_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g,
                                                                                  dtype=torch.float64)
    ls_q, ls_p = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g,
                                                                                  dtype=torch.float64)
    ours = gaussian_kl_log_sigma(mu_q, ls_q, mu_p, ls_p)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu_q, ls_q.exp()),
                                            torch.distributions.Normal(mu_p, ls_p.exp()))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # OT eq. 6 written out for one unit
    a, b, c, d = 0.3, -0.2, -0.5, 0.4  # mu_q, log_sigma_q, mu_p, log_sigma_p
    by_hand = math.log(math.exp(d) / math.exp(b)) + (math.exp(2 * b) + (a - c) ** 2) / (2 * math.exp(2 * d)) - 0.5
    assert abs(gaussian_kl_log_sigma(*(torch.tensor(v, dtype=torch.float64) for v in (a, b, c, d))).item()
               - by_hand) < 1e-12


def test_model_kl_is_dimension_normalised_and_weighted_by_the_meta_prior():
    """The model's per-layer KL is the closed form / z_l against N(0, I) at the first step and the learned
    prior after it; the free energy weights it by w1 at the first step and by w_l afterwards."""
    wm = model(meta_prior=(0.3, 0.07), w1=(0.011, 0.5))
    g = torch.Generator().manual_seed(1)
    adaptive = 0.5 * torch.randn(3, 4, wm.adaptive_dim, generator=g)  # inside the log-sigma clamp
    first = torch.zeros(3, 4, dtype=torch.bool)
    first[:, 0] = True
    out = wm.rollout(wm.zero_state(3), adaptive, first, sample=False)
    # recompute layer by layer with the closed form
    state = wm.zero_state(3)
    for t in range(4):
        for layer in range(wm.num_layers):
            a = adaptive[:, t, wm.offsets[layer]:wm.offsets[layer + 1]]
            mu_q, ls_q = torch.tanh(a[:, : wm.z_sizes[layer]]), a[:, wm.z_sizes[layer]:]
            if t == 0:
                mu_p, ls_p = torch.zeros_like(mu_q), torch.zeros_like(ls_q)
            else:
                mu_p, ls_p = wm.prior_params(state[f"d{layer}"], layer)
            ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu_q, ls_q.exp()),
                                                    torch.distributions.Normal(mu_p, ls_p.exp())).sum(-1)
            torch.testing.assert_close(out["kl"][:, t, layer], ref / wm.z_sizes[layer], atol=1e-5, rtol=1e-5)
        state, _, _, _ = wm.step(state, adaptive[:, t], first[:, t], sample=False)
    x = torch.randn(3, 4, 2, generator=g)
    terms = wm.free_energy(x, out, first)
    w = torch.tensor([[0.011, 0.5]] + [[0.3, 0.07]] * 3)
    torch.testing.assert_close(terms["kl"], (out["kl"] * w).sum((1, 2)))
    torch.testing.assert_close(terms["recon"], (x - out["x_hat"]).square().sum((1, 2)) / 2)


def test_adaptive_vectors_alone_fit_one_sequence():
    """Spec §13.1: with w = 0 and the weights frozen, optimising A alone reconstructs one sequence to
    RMSE < 0.01."""
    wm = model(meta_prior=(0.0, 0.0), w1=(0.0, 0.0), taus=[2.0, 4.0])
    first = torch.zeros(1, 12, dtype=torch.bool)
    first[:, 0] = True
    with torch.no_grad():  # a sequence the network can generate from some posterior
        source = torch.randn(1, 12, wm.adaptive_dim, generator=torch.Generator().manual_seed(5))
        x = wm.rollout(wm.zero_state(1), source, first, sample=False)["x_hat"]
    assert (x - wm.generate(1, 12, sample=False)).square().mean().sqrt() > 0.05  # far from the prior's
    before = {k: v.clone() for k, v in wm.state_dict().items()}
    window = TensorDict({"x": x}, batch_size=[1, 12])
    out = wm.infer(window, wm.initial_state(1), 150, lr=0.1)
    rmse = (out["x_hat_window"] - x).square().mean().sqrt().item()
    assert rmse < 0.01, rmse
    assert all(torch.equal(v, before[k]) for k, v in wm.state_dict().items()), "error regression moved weights"
    assert all(p.grad is None for p in wm.parameters())


def test_rows_of_different_sequences_get_independent_gradients():
    """The free energy of row i has no gradient into another row's adaptive vectors, and the summed loss
    gives each row exactly its own gradient (no shared normaliser or cross-row mixing)."""
    wm = model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 2, generator=g)
    adaptive = (0.3 * torch.randn(4, 6, wm.adaptive_dim, generator=g)).requires_grad_(True)
    first = torch.zeros(4, 6, dtype=torch.bool)
    first[:, 0] = True
    torch.manual_seed(3)
    out = wm.rollout(wm.zero_state(4), adaptive, first, sample=True)
    terms = wm.free_energy(x, out, first)
    (g_row0,) = torch.autograd.grad(terms["loss"][0], adaptive, retain_graph=True)
    assert g_row0[0].abs().sum() > 0 and g_row0[1:].abs().sum() == 0
    (g_sum,) = torch.autograd.grad(terms["loss"].sum(), adaptive, retain_graph=True)
    for i in range(4):
        (g_i,) = torch.autograd.grad(terms["loss"][i], adaptive, retain_graph=True)
        torch.testing.assert_close(g_sum[i], g_i[i])
    # and the batch loss the agent minimises is that sum (a mean would scale each row by 1/B)
    batch = TensorDict({"state": x}, batch_size=[4, 6])
    torch.manual_seed(3)
    loss = wm.loss(batch, adaptive=adaptive)["loss"]
    (g_loss,) = torch.autograd.grad(loss, adaptive)
    torch.testing.assert_close(g_loss, g_sum)


def test_adaptive_vector_store_updates_only_its_entries_and_reloads():
    store = AdaptiveVectors(capacity=3, max_steps=5, dim=2)
    rows = store.rows(torch.tensor([7, 9]))
    assert rows.tolist() == [0, 1] and store.segment_ids.tolist() == [7, 9, -1]
    steps = torch.tensor([[0, 1], [2, 3]])
    a = store.gather(rows, steps)
    (a * torch.tensor([1.0, -2.0])).sum().backward()
    store.adam_step(rows, steps, lr=0.1)
    moved = (store.values != 0).any(-1)
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[0, [0, 1]] = True
    expected[1, [2, 3]] = True
    assert torch.equal(moved, expected), "Adam moved entries outside the batch"
    torch.testing.assert_close(store.values[0, 0], torch.tensor([-0.1, 0.1]))  # Adam's first step: -lr * sign(g)
    # a second batch: the first batch's entries keep their values (no momentum step outside the batch)
    kept = store.values.detach().clone()
    store.gather(torch.tensor([1]), torch.tensor([[4]])).sum().backward()
    store.adam_step(torch.tensor([1]), torch.tensor([[4]]), lr=0.1)
    expected[1, 4] = True
    assert torch.equal(store.values[~expected], kept[~expected]) and torch.equal(store.values[0], kept[0])
    assert torch.equal(store.updates, expected.long() + torch.zeros_like(store.updates)), store.updates
    # a checkpoint reloads into a fresh store; segment 9 keeps its row
    fresh = AdaptiveVectors(capacity=3, max_steps=5, dim=2)
    fresh.load_state_dict(store.state_dict())
    assert torch.equal(fresh.values, store.values) and fresh.rows(torch.tensor([9])).tolist() == [1]
    # full: the oldest segment's row is recycled and zeroed, never a row of the same batch
    store.rows(torch.tensor([11]))
    rows = store.rows(torch.tensor([12, 9]))
    assert store.segment_ids.tolist() == [12, 9, 11] and rows.tolist() == [0, 1]
    assert store.values[0].abs().sum() == 0 and store.values[1].abs().sum() > 0
    with pytest.raises(ValueError, match="max_steps"):
        store.gather(torch.tensor([0]), torch.tensor([[5]]))


def branching_buffer(num: int = 8, steps: int = 12) -> tuple[ReplayBuffer, torch.Tensor]:
    paths, _ = branching_paths(num, steps, branch_step=5, generator=torch.Generator().manual_seed(0))
    buffer = ReplayBuffer(num * (steps + 1))
    last = torch.zeros(num, steps - 1, 1, dtype=torch.bool)
    last[:, -1] = True
    buffer.extend(TensorDict({
        "state": paths[:, :-1], "action": torch.zeros(num, steps - 1, 2),
        "next": {"state": paths[:, 1:], "reward": torch.zeros(num, steps - 1, 1),
                 "terminated": torch.zeros(num, steps - 1, 1, dtype=torch.bool), "truncated": last, "done": last}},
        batch_size=[num, steps - 1]))
    return buffer, paths


def small_agent(**kw) -> PVRNNAgent:
    torch.manual_seed(0)
    config = PVRNNAgent.make_config("smoke", d_sizes=[12, 6], z_sizes=[2, 1], taus=[2.0, 6.0], seq_len=12,
                                    max_steps=12, batch_size=8, num_sequences=8, lr=1e-2, **kw)
    return PVRNNAgent(config, (2,), 2)


def test_agent_update_keys_adaptive_vectors_by_segment_and_checkpoints_them():
    buffer, _ = branching_buffer()
    agent = small_agent()
    batch = buffer.sample(4, horizon=11, keys=("state",))
    before = agent.adaptive_vectors.values.detach().clone()
    agent.update(batch)
    ids = batch["segment_id"][:, 0]
    rows = agent.adaptive_vectors.rows(ids, create=False)
    changed = (agent.adaptive_vectors.values != before).flatten(1).any(1)
    assert torch.equal(changed.nonzero().flatten().sort().values, torch.unique(rows).sort().values)
    state = agent.state_dict()
    other = small_agent()
    other.load_state_dict(state)
    assert torch.equal(other.adaptive_vectors.values, agent.adaptive_vectors.values)
    assert torch.equal(other.adaptive_vectors.rows(ids, create=False), rows)


# ------------------------------------------------------------------------- error regression, plans


@pytest.fixture(scope="module")
def trained():
    """A small agent trained full batch on 8 branching paths of 12 steps (a few seconds)."""
    torch.set_num_threads(1)
    buffer, paths = branching_buffer()
    agent = small_agent()
    table = buffer.episodes()
    batch = torch.stack([buffer.episode(int(i), keys=("state",)).select("state", "segment_id", "segment_step")
                         for i in table["id"]])
    first = agent.update(batch)
    for _ in range(200):
        metrics = agent.update(batch)
    agent.eval()
    held_out, _ = branching_paths(6, 12, branch_step=5, generator=torch.Generator().manual_seed(99))
    return agent, paths, held_out, (first, metrics)


def test_training_fits_the_paths(trained):
    _, _, _, (first, last) = trained
    assert last["rmse"] < first["rmse"] / 4 and last["rmse"] < 0.1, (first, last)


def test_error_regression_lowers_window_and_one_step_errors(trained):
    """Spec §13.4 on held-out paths: the window reconstruction after ER is below iteration 0, and the
    one-step-ahead prediction with ER beats prior-only prediction (the same policy, 0 iterations)."""
    agent, _, held_out, _ = trained
    wm = agent.world_model
    window = TensorDict({"x": held_out[:, :6]}, batch_size=[6, 6])
    out = wm.infer(window, wm.initial_state(6), 30, history=True)
    hist = out["recon_history"]
    assert (hist[:, -1] < hist[:, 0]).all(), hist[:, [0, -1]]

    def one_step_rmse(policy):
        carry, errs = policy.init_carry(6), []
        for t in range(11):
            _, carry = policy.step(TensorDict({"state": held_out[:, t]}, batch_size=[6]), carry,
                                   torch.full((6,), t == 0))
            errs.append((carry["x_hat"] - held_out[:, t + 1]).square().mean())
        return torch.stack(errs).mean().sqrt().item()

    config = {**agent.config.__dict__, "er_window": 5, "er_iters": 20}
    er = one_step_rmse(PVRNNPolicy(wm, PVRNNAgent.make_config("smoke", **config), 2))
    prior = one_step_rmse(PVRNNPolicy(wm, PVRNNAgent.make_config("smoke", **{**config, "er_iters": 0}), 2))
    assert er < 0.8 * prior, (er, prior)


def test_error_regression_moves_only_the_window(trained):
    """Weights stay, padded slots keep their vectors, and the belief at the window start is an input."""
    agent, _, held_out, _ = trained
    wm = agent.world_model
    before = {k: v.clone() for k, v in wm.state_dict().items()}
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[:, :2] = False
    given = torch.randn(2, 5, wm.adaptive_dim)
    window = TensorDict({"x": held_out[:2, :5], "valid": valid, "adaptive": given}, batch_size=[2, 5])
    state = wm.initial_state(2)
    out = wm.infer(window, state, 5)
    assert torch.equal(out["adaptive"][:, :2], given[:, :2]), "ER moved vectors outside the window"
    assert not torch.equal(out["adaptive"][:, 2:], given[:, 2:])
    assert all(torch.equal(v, before[k]) for k, v in wm.state_dict().items())
    assert out["steps"].tolist() == [3, 3]


def test_glean_plan_reaches_the_goal_with_goal_only_accuracy(trained):
    agent, paths, _, _ = trained
    wm = agent.world_model
    goal = torch.tensor([[0.2, 0.8], [0.85, 0.3]])
    g = torch.Generator().manual_seed(0)
    plan = wm.plan(goal, 12, start=paths[:2, 0], candidates=1, iters=150, lr=0.1, generator=g)
    unplanned = (wm.generate(2, 12, sample=False)[:, -1] - goal).square().mean(-1)
    assert (plan["goal_error"] < 3e-3).all() and (plan["goal_error"] < unplanned / 10).all(), (plan, unplanned)
    assert branch_side(plan["x_hat"]).tolist() == [True, False]
    # a masked dim is free: asking for x only leaves y to the model
    masked = wm.plan(torch.tensor([[0.2, 5.0]]), 12, goal_mask=torch.tensor([1.0, 0.0]), candidates=1, iters=100,
                     generator=g)
    assert abs(masked["x_hat"][0, -1, 0].item() - 0.2) < 0.03 and masked["x_hat"][0, -1, 1].item() < 2.0


def test_infer_task_plans_and_the_policy_tracks_the_plan(trained):
    agent, paths, _, _ = trained
    agent.config.plan_iters, agent.config.plan_horizon, agent.config.plan_candidates = 30, 12, 2
    obs = TensorDict({"state": torch.tensor([[0.2, 0.8]]), "start": {"state": paths[:1, 0]}}, batch_size=[1])
    task = agent.infer_task(GoalObservation(obs))
    assert task.z.shape == (1, 12, 2) and task.info["kind"] == "plan"
    policy = agent.policy(task)
    carry = policy.init_carry(1)
    x0 = paths[:1, 0]
    action, carry = policy.step(TensorDict({"state": x0}, batch_size=[1]), carry, torch.ones(1, dtype=torch.bool))
    expected = pd_control(x0, task.z[:, 1], torch.zeros_like(x0), agent.config.kp, agent.config.kd)
    torch.testing.assert_close(action, expected)
    with pytest.raises(UnsupportedTaskError):
        agent.infer_task(RewardSamples(obs, torch.zeros(1, 1)))


def test_pd_control():
    q, target, qdot = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.1, 0.0]]), torch.tensor([[0.2, 0.0]])
    torch.testing.assert_close(pd_control(q, target, qdot, kp=5.0, kd=0.5), torch.tensor([[0.4, -1.0]]))


def test_policy_window_slides_and_advances_its_start_belief(trained):
    agent, paths, _, _ = trained
    wm, w = agent.world_model, agent.config.er_window
    policy = agent.policy()
    carry = policy.init_carry(1)
    for t in range(w + 2):
        _, new = policy.step(TensorDict({"state": paths[:1, t]}, batch_size=[1]), carry,
                             torch.full((1,), t == 0))
        if t == w:  # the first slide: the start belief advances by one posterior step with the dropped vector
            expected, _, _, _ = wm.step(wm._core(carry), carry["adaptive"][:, 0], torch.ones(1, dtype=torch.bool),
                                        sample=False)
            torch.testing.assert_close(new["d0"], expected["d0"])
        carry = new
    assert torch.equal(carry["x"][0], paths[0, 2:w + 2]) and bool(carry["valid"].all())
    assert carry["start_steps"].item() == 2 and carry["t"].item() == w + 2


# ------------------------------------------------------------------------ GLean's balance and protocol


def test_recon_weight_scales_only_the_accuracy():
    """``recon_weight`` multiplies the reconstruction term (GLean's softmax-code balance) and nothing else."""
    plain, weighted = model(), model(recon_weight=10.0)  # same seed: same weights
    g = torch.Generator().manual_seed(3)
    adaptive = 0.5 * torch.randn(3, 5, plain.adaptive_dim, generator=g)
    x = torch.rand(3, 5, 2, generator=g)
    first = torch.zeros(3, 5, dtype=torch.bool)
    first[:, 0] = True
    out = plain.rollout(plain.zero_state(3), adaptive, first, sample=False)
    a, b = plain.free_energy(x, out, first), weighted.free_energy(x, out, first)
    torch.testing.assert_close(b["recon"], 10.0 * a["recon"])
    torch.testing.assert_close(b["kl"], a["kl"])
    torch.testing.assert_close(b["loss"], 10.0 * a["recon"] + a["kl"])
    with pytest.raises(ValueError, match="recon_weight"):
        model(recon_weight=0.0)


def test_glean_plan_protocol_reweights_the_accuracy_and_samples(trained):
    """GLean's planning_auto_weight scales the start + goal accuracy by T x rec_weighting / 3, the KL not at
    all; with ``sample`` every pass (and the returned plan) draws z, without it the plan is deterministic."""
    agent, paths, _, _ = trained
    wm = agent.world_model
    goal, start = torch.tensor([[0.2, 0.8]]), paths[:1, 0]

    def loss(**kw):
        return wm.plan(goal, 12, start=start, candidates=1, iters=0, generator=torch.Generator().manual_seed(0),
                       **kw)["loss"].item()

    l0, l1, l2 = loss(), loss(rec_weighting=1.0), loss(rec_weighting=2.0)
    # accuracy a, KL k: l0 = a + k, l1 = 4a + k, l2 = 8a + k (T = 12: weight 12 x r / 3)
    assert l1 > l0 and abs((l2 - l1) / (l1 - l0) - 4.0 / 3.0) < 1e-3, (l0, l1, l2)

    def plan(sample: bool, seed: int, iters: int) -> dict:  # one candidate: no selection among samples
        torch.manual_seed(seed)
        return wm.plan(goal, 12, start=start, candidates=1, iters=iters, generator=torch.Generator().manual_seed(0),
                       sample=sample)

    # the returned plan is a sample (iters = 0: only the final pass draws z) ...
    assert torch.equal(plan(False, 1, 0)["x_hat"], plan(False, 2, 0)["x_hat"])
    assert not torch.equal(plan(True, 1, 0)["x_hat"], plan(True, 2, 0)["x_hat"])
    torch.testing.assert_close(plan(True, 1, 0)["x_hat"], plan(True, 1, 0)["x_hat"])
    # ... and the iterations optimise the sampled free energy
    assert torch.equal(plan(False, 1, 3)["adaptive"], plan(False, 2, 3)["adaptive"])
    assert not torch.equal(plan(True, 1, 3)["adaptive"], plan(True, 2, 3)["adaptive"])


# ------------------------------------------------------------------------------- Setting B's data path


def test_setting_b_records_the_fsm_through_make_env_into_the_buffer():
    """The benchmark's Setting B collects the scripted FSM through ``make_env`` (joints reset to home by
    ``set_physics_state``) into a ``ReplayBuffer``: whole episodes, in env order, with the PD's torques."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    spec = importlib.util.spec_from_file_location(
        "bench_pv_rnn", Path(__file__).resolve().parents[1] / "scripts" / "bench_pv_rnn.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    steps, rng = 6, np.random.default_rng(0)
    env = bench.reacher_env(2, 0, steps)
    buffer = ReplayBuffer(2 * (steps + 2))
    try:
        states = bench.run_episodes(env, bench.fsm_actor(["B", "C"], steps, 2, rng), steps, rng, buffer)
    finally:
        env.close()
    batch = bench.full_batch(buffer)
    assert batch.batch_size == (2, steps + 1) and bool(buffer.episodes()["complete"].all())
    torch.testing.assert_close(batch["state"], states)
    assert (states[:, 0, :2] - torch.tensor(bench.HOME)).abs().max() < 0.15  # started at home
    assert (states[:, 0, 4:] == 0).all()  # at rest
    table = buffer.episodes()
    first = buffer.episode(int(table["id"][0]))
    s = first["state"][:-1]
    targets = torch.from_numpy(bench.primitive_targets("B", steps, 2, np.random.default_rng(0))).float()
    assert first["action"][:-1].abs().max() <= 1.0 and (first["action"][:-1] != 0).any()
    # the first action is the PD toward the first target (targets drawn from the same stream)
    torch.testing.assert_close(first["action"][0], pd_control(s[0, :2], targets[0], s[0, 4:], bench.KP, bench.KD))


def test_bench_model_dir_reloads_a_trained_model_and_never_unpickles(tmp_path, monkeypatch):
    """``bench_pv_rnn.py --model-dir``: a Setting A model trained once is written there atomically and loaded the
    next time instead of retrained; a file there that needs pickle (which can run code) is refused, not opened."""
    import importlib.util
    import os
    from pathlib import Path
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location(
        "bench_pv_rnn", Path(__file__).resolve().parents[1] / "scripts" / "bench_pv_rnn.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trained = []

    def fake_training(agent, batch, epochs, label):  # a stand-in for the full-batch epochs
        trained.append(label)
        with torch.no_grad():
            for param in agent.parameters():
                param.add_(0.25)
        return [{"epoch": 0, "recon": 1.5}]

    monkeypatch.setattr(bench, "train_full_batch", fake_training)
    args = SimpleNamespace(recon_weight=10.0, lr_a=5e-3, epochs_a=2, glean_data=None, model_dir=tmp_path,
                           er_window=10, er_iters=5, plan_iters=5)
    first, _, history = bench.trained_agent_a(args, None, "weak", bench.META_PRIORS["weak"], 0)
    again, _, history_again = bench.trained_agent_a(args, None, "weak", bench.META_PRIORS["weak"], 0)
    assert len(trained) == 1 and history_again == history == [{"epoch": 0, "recon": 1.5}]
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    (path,) = tmp_path.glob("A_weak_*.pt")

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"agent": first.state_dict(), "train_seconds": 1.0, "history": RunsCode()}, path)
    with pytest.raises(SystemExit, match="refusing to open .*needs pickle"):
        bench.trained_agent_a(args, None, "weak", bench.META_PRIORS["weak"], 0)
    assert not marker.exists()


# ------------------------------------------------------------------------ pixels through train_agent.py


def test_train_agent_on_a_pixel_dataset_and_load_policy(tmp_path):
    """``collect_dataset.py`` writes a small reacher dataset with frames; ``train_agent.py agent=pv_rnn
    data=<it>`` with ``obs_type=pixels`` trains the autoencoder (then frozen) and the PV-RNN on its latents;
    the model directory loads with ``load_policy`` and its policy acts on frames like the trained agent's."""
    from latentrl import load_policy
    from latentrl.training.checkpoint import load_agent
    from latentrl.training.cli import collect_main, train_main

    common = ["log.progress=false", "log.tensorboard=false", "eval.video=false", "env=reacher-easy",
              "env.episode_length=12"]
    data = tmp_path / "reacher-pixels"
    collect_main(["preset=smoke", *common, "env.obs=[pixels,state,physics]", "steps=60", "learning_starts=24",
                  f"out={data}", f"run_dir={tmp_path / 'collect'}"])
    run = tmp_path / "run"
    train_main(["agent=pv_rnn", "agent.preset=smoke", f"data={data}", *common, "env.obs=[pixels]", "eval.every=0",
                "eval.at_end=false", "steps=8", "agent.obs_type=pixels", "agent.seq_len=6",
                "agent.autoencoder_updates=4", f"run_dir={run}"])
    agent, _ = load_agent(run / "checkpoints" / "latest.pt")
    assert agent.config.obs_type == "pixels" and int(agent.autoencoder_steps) == 4  # trained, then frozen
    assert bool((agent.adaptive_vectors.segment_ids >= 0).any())  # rows keyed by the dataset's segments
    policy = load_policy(run / "model")
    frames = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    obs = TensorDict({"pixels": frames}, batch_size=[2])
    first = torch.ones(2, dtype=torch.bool)
    a, carry = policy.step(obs, policy.init_carry(2), first)
    b, ref = agent.policy().step(obs, agent.policy().init_carry(2), first)
    assert a.shape == (2, 2) and a.abs().max() <= 1.0
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(carry["x"][:, -1], agent.world_model.features(frames))
