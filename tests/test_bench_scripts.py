"""The benchmark scripts: their reporting logic with the measurement runs faked, and their baselines."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
STUDIES = SCRIPTS.parent / "docs"  # the one-off studies beside the benchmark pages, docs/<page>/<study>.py


def _load(name: str, folder: Path = SCRIPTS):
    """Import ``folder/name.py`` (a bench script, or with ``folder`` a study under docs/) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_envs():
    return _load("bench_envs")


EGL_FAILURE = ("{...} failed (exit code 1):\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
               "OpenGL.raw.EGL._errors.EGLError: EGLError(\n\terr = EGL_BAD_ALLOC,\n"
               "\tbaseOperation = eglCreateContext,\n)")


def test_last_error_line_keeps_the_exception_and_its_continuation(bench_envs):
    line = bench_envs.last_error_line(RuntimeError(EGL_FAILURE))
    assert line.startswith("OpenGL.raw.EGL._errors.EGLError") and "EGL_BAD_ALLOC" in line
    assert "eglCreateContext" in line
    assert bench_envs.last_error_line(RuntimeError("plain message")) == "plain message"


def test_mjwarp_report_keeps_the_runs_that_worked_when_one_side_fails(bench_envs, tmp_path, monkeypatch):
    def fake_spawn(spec, timeout):
        if spec["job"] == "check":
            return {"ok": True}
        if spec.get("side") == "dmc" or spec["job"] == "frames_mjwarp":
            raise RuntimeError(EGL_FAILURE)
        return {"fps": [1000.0 * spec["workers"], 1100.0 * spec["workers"]], "startup_s": 2.0,
                "pixels_shape": [spec["workers"], 3, 64, 64]}

    monkeypatch.setattr(bench_envs, "spawn", fake_spawn)
    monkeypatch.setattr(bench_envs, "processor_name", lambda device: "fake GPU")
    out = tmp_path / "report.md"
    assert bench_envs.main(["--backend", "mjwarp", "--device", "cpu", "--num-envs", "4", "16", "--workers", "1",
                            "--rounds", "2", "--out", str(out), "--frames-dir", str(tmp_path / "frames")]) == 0
    report = out.read_text()
    assert "| walker-walk | mjwarp | 16 | cpu | 16,800 | - |" in report  # median of 2 rounds x 2 segments
    assert "| walker-walk | dmc | 1 | cpu, 1 worker(s) | failed (below) |" in report
    assert "## Failed runs" in report and "EGL_BAD_ALLOC" in report


def test_dmc_report_marks_a_failed_worker_count_and_keeps_the_rest(bench_envs, tmp_path, monkeypatch):
    def fake_spawn(spec, timeout):
        if spec["side"] == "torchrl" and spec["workers"] == 2:
            raise RuntimeError(EGL_FAILURE)
        return {"fps": [100.0 * spec["workers"]], "startup_s": 1.0, "pixels_shape": [spec["workers"], 3, 64, 64]}

    monkeypatch.setattr(bench_envs, "spawn", fake_spawn)
    monkeypatch.setattr(bench_envs, "gl_renderer", lambda: "fake GL")
    out = tmp_path / "report.md"
    assert bench_envs.main(["--workers", "1", "2", "--rounds", "1", "--segments", "1", "--out", str(out),
                            "--frames-dir", ""]) == 0
    report = out.read_text()
    assert "| walker-walk | 1 | 100 | 100 | 1.0x |" in report
    assert "| walker-walk | 2 | 200 | failed (below) | - |" in report
    assert "walker-walk, 2 worker(s): not measured (a run failed)" in report
    assert "- walker-walk torchrl 2: `OpenGL.raw.EGL._errors.EGLError" in report


def test_metra_random_baseline_counts_the_same_env_steps_with_parallel_envs():
    """bench_metra's random total-coverage baseline may run its episodes side by side (fast on a GPU):
    a checkpoint is read once the env steps of all envs together reach it."""
    bench_metra = _load("bench_metra")
    kwargs = dict(episode_length=20, action_repeat=2, bin_size=0.05, seed=0)
    serial = bench_metra.random_total_coverage("cheetah-run", [40, 200], **kwargs)
    parallel = bench_metra.random_total_coverage("cheetah-run", [40, 200], num_envs=8, **kwargs)
    assert len(serial) == len(parallel) == 2
    assert 1 < serial[0] <= serial[1] and 1 < parallel[0] <= parallel[1]


def test_metra_coverage_buffer_checkpoint_resumes_with_its_cells(tmp_path):
    """The pixel bench's buffer keeps the cells its episodes visited through a checkpoint, which must load with
    ``weights_only=True``: the cells were np.int64 tuples, and a 160k-step LSD run (2026-12-05) saved fine and was
    refused at its resume."""
    import numpy as np

    from latentrl.agents import agent_class
    from latentrl.training.checkpoint import load_checkpoint, save_checkpoint

    bench_metra = _load("bench_metra")
    buffer = bench_metra.CoverageRecordingBuffer(16, "cheetah-run", 1.0)
    buffer.cells.update(map(tuple, np.floor(np.array([[-1.5], [0.2], [2.7]])).astype(np.int64)))  # as extend()
    cls = agent_class("metra")
    agent = cls(cls.make_config("smoke", obs_type="state"), (17,), 6, device="cpu")
    path = save_checkpoint(tmp_path / "latest.pt", agent, counters={"env_steps": 0, "updates": 0, "episodes": 0},
                           config={}, buffer_state=buffer.state_dict())
    resumed = bench_metra.CoverageRecordingBuffer(16, "cheetah-run", 1.0)
    resumed.load_state_dict(load_checkpoint(path)["buffer"])
    assert resumed.cells == {(-2,), (0,), (2,)}


def test_metra_coverage_trainer_resumes_its_curve_and_wall_time(tmp_path):
    """A pixel run stopped between evaluations (the 2026-12-05 LSD run) resumes with its coverage curve and wall
    time up to its checkpoint, not only the evaluations made after the resume: each evaluation's row is kept in
    the run folder, and rows past the checkpoint (the stop lost those steps) are dropped."""
    from latentrl.training.cli import load_config

    bench_metra = _load("bench_metra")

    def trainer(steps, *extra):
        cfg = load_config(["preset=smoke", "log.progress=false", "log.tensorboard=false", "agent=metra",
                           "env=cheetah-run", "env.obs=[state,physics]", "env.episode_length=10", f"steps={steps}",
                           "eval.every=20", "checkpoint_every=20", "eval.episodes=1", "eval.video=false",
                           "eval.at_end=false", f"run_dir={tmp_path}", *extra])
        return bench_metra.CoverageTrainer(cfg, tmp_path, agent_overrides={"obs_type": "state", "eval_num_skills": 2})

    first = trainer(40)
    first.train()
    curve_file = tmp_path / bench_metra.CoverageTrainer.CURVE_FILE
    rows = json.loads(curve_file.read_text())
    assert [r["env_steps"] for r in rows] == [1, 20, 40]
    # an evaluation after the last checkpoint, lost with the stop
    curve_file.write_text(json.dumps([*rows, {**rows[-1], "env_steps": 50, "wall_s": 99.0}]))
    resumed = trainer(60, "resume=true")
    assert resumed.curve == rows
    resumed.train()
    assert [r["env_steps"] for r in resumed.curve] == [1, 20, 40, 60]
    walls = [r["wall_s"] for r in resumed.curve]
    assert walls == sorted(walls) and walls[-1] < 99.0  # the wall clock goes on from the checkpoint's evaluation
    assert json.loads(curve_file.read_text()) == resumed.curve


def _metra_curve(coverages: list[float], every: int = 20000) -> list[dict]:
    return [{"env_steps": i * every, "updates": i * every // 8, "wall_s": 60.0 * i, "coverage": c,
             "total_coverage": c + 1, "skill_direction_cos": 0.5, "mean_travel": 0.1 * c}
            for i, c in enumerate(coverages)]


def _pixel_baselines_page(tmp_path, finals: dict[str, list[float]], curve_notes: dict | None = None
                          ) -> tuple[str, Path]:
    """``bench_metra.py --part pixels --report`` on runs made by ``--algo`` (seeds 0, 1, ..., 60k steps, seed k
    ending at ``finals[algo][k]`` cells) beside a plain METRA pixel run brought in by ``--report-extra`` (100k steps:
    9 cells at 60k, 17 beyond it; random actions 3); ``curve_notes[(algo, seed)]``: a repaired record's note.
    Returns the page's text and the extra file."""
    bench_metra = _load("bench_metra")
    out = tmp_path / "bl"
    for algo, per_seed in finals.items():
        for seed, final in enumerate(per_seed):
            (out / f"{algo}-seed{seed}").mkdir(parents=True)
            run = {"part": "pixels", "algo": algo, "task": "cheetah-run", "steps": 60000, "seed": seed,
                   "threads": 2, "updates": 7000, "train_seconds": 180.0, "overrides": ["env.num_envs=8"],
                   "machine": "test machine", "curve": _metra_curve([2.0, 2.0, 2.0, final])}
            if (algo, seed) in (curve_notes or {}):
                run["curve_note"] = curve_notes[(algo, seed)]
            (out / f"{algo}-seed{seed}" / "results_pixels.json").write_text(json.dumps(run))
    metra = {"part": "pixels", "task": "cheetah-run", "steps": 100000, "seed": 0, "threads": 2,
             "curve": _metra_curve([2.0, 2.0, 4.0, 9.0, 15.0, 17.0]), "random_eval_coverage": 3,
             "random_total_coverage": [1, 3, 3, 3, 3, 3]}
    extra = tmp_path / "results_pixels.json"
    extra.write_text(json.dumps(metra))
    page = tmp_path / "baselines_pixels.md"
    bench_metra.write_report(out, page, "pixels", [str(extra)], None, None)
    return page.read_text(), extra


@pytest.mark.parametrize("diayn_final, verdict", [(2.0, "holds"), (9.0, "fails"), (20.0, "fails")])
def test_metra_pixel_baselines_page_cuts_the_metra_run_at_the_budget_and_judges_diayn(tmp_path, diayn_final, verdict):
    """``bench_metra.py --part pixels --report``: the DIAYN run made by ``--algo diayn`` beside the plain METRA pixel
    run (``--report-extra``) cut at the DIAYN run's budget; the check 'METRA > DIAYN' read at that budget, the
    pixel setting and the commands that made the runs on the page, the runs not made listed."""
    text, extra = _pixel_baselines_page(tmp_path, {"diayn": [diayn_final]})
    assert "coverage from pixels" in text and "64x64 frames" in text and "16 deterministic skill rollouts" in text
    assert f"METRA > DIAYN at equal budget: mean 9.0 vs {diayn_final:.1f}: **{verdict}**" in text
    assert "METRA ≥ 2 x random (evaluation coverage, mean over seeds): 9.0 vs 3.0" in text
    assert "--algo diayn --seeds 0 " in text and f"--report-extra {extra} --report-budget 60000" in text
    assert "2 torch threads" in text and "every 20,000 steps" in text
    assert "LSD seed 0" in text.split("Runs not made")[1] and "DIAYN seed 0" not in text.split("Runs not made")[1]
    assert "17 at 100k" in text  # the METRA run's evaluations beyond the budget are named, not counted
    summary = json.loads((tmp_path / "baselines_pixels" / "results_pixels.json").read_text())
    assert summary["metra"]["0"]["curve"][-1]["env_steps"] == 60000
    assert (tmp_path / "baselines_pixels" / "coverage_pixels.png").is_file()


def test_metra_pixel_baselines_page_names_a_repaired_record(tmp_path):
    """A run record mended by hand (LSD seed 1's curve before its resume, rebuilt from its metrics.csv) says so on
    the page and in the gathered results; the other runs carry no note."""
    text, _ = _pixel_baselines_page(tmp_path, {"lsd": [3.0, 2.0], "diayn": [2.0]},
                                    {("lsd", 1): "rows 0-40k rebuilt from metrics.csv"})
    assert "LSD seed 1's record: rows 0-40k rebuilt from metrics.csv." in text
    # the one command line lists every seed made; each learner's own seeds are named (METRA's run came from extra)
    assert "(each learner with its own seeds): LSD seeds 0, 1; DIAYN seed 0." in text
    assert text.count("'s record:") == 1
    summary = json.loads((tmp_path / "baselines_pixels" / "results_pixels.json").read_text())
    assert summary["lsd"]["1"]["curve_note"] == "rows 0-40k rebuilt from metrics.csv"
    assert "curve_note" not in summary["lsd"]["0"]


def test_metra_pixel_baselines_report_keeps_the_runs_whose_folder_is_gone(tmp_path):
    """Runs are added one per session and a session's folders may not survive: a later ``--report`` takes the
    runs missing under ``--out`` from the page's own results file, a run still under ``--out`` (or re-run) wins
    over the page's copy, and a report read back from its own file alone writes the same file again."""
    bench_metra = _load("bench_metra")
    text, extra = _pixel_baselines_page(tmp_path, {"diayn": [2.0, 3.0]})
    out, page = tmp_path / "bl", tmp_path / "baselines_pixels.md"
    results = tmp_path / "baselines_pixels" / "results_pixels.json"
    first = json.loads(results.read_text())
    records = tmp_path / "baselines_pixels" / "runs"  # the records copied beside the page
    kept = records / "diayn-seed0" / "results_pixels.json"
    assert kept.read_bytes() == (out / "diayn-seed0" / "results_pixels.json").read_bytes()
    assert "are in [baselines_pixels/runs/](baselines_pixels/runs/)" in text
    shutil.rmtree(out / "diayn-seed0")  # lost with its session
    rerun = json.loads((out / "diayn-seed1" / "results_pixels.json").read_text())
    rerun["curve"][-1]["coverage"] = 5.0
    (out / "diayn-seed1" / "results_pixels.json").write_text(json.dumps(rerun))
    (out / "diayn-seed1" / "skills_pixels.png").write_bytes(b"the rerun's skills")
    (out / "lsd-seed0").mkdir()
    (out / "lsd-seed0" / "results_pixels.json").write_text(json.dumps({**rerun, "algo": "lsd", "seed": 0}))
    bench_metra.write_report(out, page, "pixels", [str(extra)], None, None)
    text = page.read_text()
    second = json.loads(results.read_text())
    assert second["diayn"]["0"] == first["diayn"]["0"]  # kept from the page
    assert second["diayn"]["1"]["curve"][-1]["coverage"] == 5.0  # the folder's record, not the page's 3.0
    assert json.loads(kept.read_text())["curve"][-1]["coverage"] == 2.0  # kept, not removed with the folder
    new_record = json.loads((records / "diayn-seed1" / "results_pixels.json").read_text())
    assert new_record["curve"][-1]["coverage"] == 5.0  # the new record replaces the old
    for plot in (records / "diayn-seed1" / "skills_pixels.png", records.parent / "skills_pixels_diayn_seed1.png"):
        assert plot.read_bytes() == b"the rerun's skills"  # with its skills plot, in the record and on the page
    assert second["lsd"]["0"]["curve"][-1]["coverage"] == 5.0
    assert second["metra"]["0"]["from_extra"] and second["metra"]["0"]["curve"][-1]["env_steps"] == 60000
    assert "| 2 | 5 | not run | 3.5 ± " in text
    assert "LSD seed 0; DIAYN seeds 0, 1." in text and "17 at 100k" in text
    shutil.rmtree(out)  # every run gone: the page's file alone, the METRA run still from --report-extra
    out.mkdir()
    bench_metra.write_report(out, page, "pixels", [str(extra)], None, None)
    assert json.loads(results.read_text()) == second and page.read_text() == text


@pytest.mark.parametrize("lsd, diayn, reading", [
    ([3.0], [2.0], "mean 3.0 vs 2.0 (1 and 1 seeds): LSD is ahead; both at or below random actions' 3.0."),
    ([4.0], [2.0], "mean 4.0 vs 2.0 (1 and 1 seeds): LSD is ahead."),
    ([2.0], [4.0], "mean 2.0 vs 4.0 (1 and 1 seeds): LSD is not ahead."),  # DIAYN above random
    ([2.0, 2.0], [2.0], "mean 2.0 vs 2.0 (2 and 1 seeds): LSD is not ahead; both at or below random actions' 3.0."),
])
def test_metra_pixel_baselines_page_orders_lsd_and_diayn_with_seeds_and_random(tmp_path, lsd, diayn, reading):
    """The page's LSD-vs-DIAYN line names the seeds behind each mean and says when both learners stay at random
    actions' coverage (one seed each from pixels: LSD 3 cells, DIAYN 2, random 3)."""
    text, _ = _pixel_baselines_page(tmp_path, {"lsd": lsd, "diayn": diayn})
    assert f"- LSD vs DIAYN: {reading}" in text
    assert (f"- METRA vs LSD (not one of the note's checks): mean 9.0 vs {sum(lsd) / len(lsd):.1f} "
            f"(1 and {len(lsd)} seeds)") in text


def test_machine_description_names_the_cores_and_versions():
    import os

    import torch

    from latentrl.training.logger import machine_description

    text = machine_description("cpu")
    assert f"{os.cpu_count()} CPUs" in text and f"torch {torch.__version__}" in text and "GPU" not in text


def test_bench_active_inference_set_overrides_are_typed_and_refused_clearly():
    """``--set KEY=VALUE`` takes the field's type; ``none`` only where the field is optional."""
    bench = _load("bench_active_inference")
    parsed = bench.parse_overrides(["max_grad_norm=none", "obs_std=0.05", "batch_size=32", "decoder=conv"])
    assert parsed == {"max_grad_norm": None, "obs_std": 0.05, "batch_size": 32, "decoder": "conv"}
    assert isinstance(parsed["batch_size"], int)
    assert bench.parse_overrides(["max_grad_norm=5"]) == {"max_grad_norm": 5.0}
    with pytest.raises(SystemExit, match=r"obs_std=null: ActiveInferenceConfig.obs_std must be set .*e.g. obs_std=0.1"):
        bench.parse_overrides(["obs_std=none"])
    with pytest.raises(SystemExit, match=r"batch_size=abc: .* must be an integer \(the default has 64\)"):
        bench.parse_overrides(["batch_size=abc"])
    with pytest.raises(SystemExit, match=r"max_grad_norm=fast: .* must be a number or null"):
        bench.parse_overrides(["max_grad_norm=fast"])
    with pytest.raises(SystemExit, match="KEY one of"):
        bench.parse_overrides(["obs_sdt=0.1"])


def test_bench_active_inference_static_pixels_are_the_scene_outside_the_moving_object():
    """Check 1's split of the error: the mask excludes exactly the pixels the object covers in either frame."""
    import torch

    bench = _load("bench_active_inference")
    scene = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5
    current, target = scene.repeat(5, 1, 1, 1), scene.repeat(5, 1, 1, 1)
    for i in range(5):  # a 2x2 object moving one pixel right per frame, a different place in every sample
        current[i, :, i:i + 2, i:i + 2] = 0.9
        target[i, :, i:i + 2, i + 1:i + 3] = 0.9
    static = bench.static_pixels(current, target)
    assert static.shape == target.shape
    moving = ~static[:, 0]
    for i in range(5):
        expected = torch.zeros(8, 8, dtype=torch.bool)
        expected[i:i + 2, i:i + 3] = True
        assert torch.equal(moving[i], expected), i


def test_bench_active_inference_quick_writes_the_report_figures_and_numbers(tmp_path):
    """``bench_active_inference.py --quick`` runs every check end to end (tiny data and model) in seconds."""
    import json

    bench = _load("bench_active_inference")
    out, figs = tmp_path / "report.md", tmp_path / "figs"
    assert bench.main(["--quick", "--out", str(out), "--fig-dir", str(figs)]) == 0
    report = out.read_text()
    for text in ("one-step prediction MSE", "best 20%", "goal reaching", "copy-frame", "| check |",
                 "risk-only ablation", "p99 (ms)", "| realtime |", "5. epistemic value"):
        assert text in report
    for name in ("free_energy.png", "imagined.png", "goal_reaching.png", "efe_terms.png", "results.json"):
        assert (figs / name).stat().st_size > 0
    results = json.loads((figs / "results.json").read_text())
    assert {"train", "check1", "check2", "check3", "check5", "latency", "strip", "config", "machine"} <= results.keys()
    assert results["train"]["updates"] == 6 and len(results["train"]["free_energy"]) == 6
    # each part's largest gradient norm per log window beside the global one: the global is the parts' root sum of
    # squares in every update, so a window's global max is at most that of the parts and at least their largest
    tr = results["train"]
    parts = tr["grad_norm_parts_max"]
    assert set(parts) == {"encoder", "posterior", "transition", "decoder", "reward"}
    assert all(len(v) == len(tr["grad_norm_parts_steps"]) == 6 for v in parts.values())
    for i, total in enumerate(tr["grad_norm_max"]):
        window = [v[i] for v in parts.values()]
        assert max(window) <= total * (1 + 1e-5) and total <= sum(w * w for w in window) ** 0.5 * (1 + 1e-5)
    # and each part's largest step per window, on the same windows (one update each here: Adam's first step moves
    # every parameter with a gradient by lr, so the encoder's is lr x sqrt(its size) up to the few without one)
    sizes = tr["step_parts_max"]
    assert set(sizes) == set(parts) and all(len(v) == 6 for v in sizes.values())
    n_encoder = sum(p.numel() for p in bench.build_agent(bench.parse_args(["--quick"])).parameter_groups()["encoder"])
    lr = results["config"]["lr"]
    assert 0.9 * lr * n_encoder ** 0.5 <= sizes["encoder"][0] <= lr * n_encoder ** 0.5 * (1 + 1e-4)
    c1 = results["check1"]
    assert {"model_mse", "copy_frame_mse", "pass"} <= c1.keys()
    assert 0.0 <= c1["model_mse_static_part"] <= c1["model_mse"] and "on the static scene" in report
    assert 0.0 <= results["check2"]["G_fraction_in_best_20pct"] <= 1.0
    assert 0.0 <= results["check2"]["observation_risk_G_fraction_in_best_20pct"] <= 1.0
    assert "by G with the observation risk" in report
    c3 = results["check3"]
    for name in ("agent", "risk_only", "random", "zero"):
        assert {"success", "mean_distance"} <= c3[name].keys()
        assert len(c3["curves"][name]["mean_distance"]) == c3["steps"]
        # per goal: the final distances behind the success rate and the mean, and the curve's last step
        final = c3[name]["final_distance"]
        assert len(final) == c3["goals"] and abs(sum(final) / len(final) - c3[name]["mean_distance"]) < 1e-9
        assert sum(d < c3["success_radius"] for d in final) / len(final) == c3[name]["success"]
        assert abs(c3["curves"][name]["mean_distance"][-1] - c3[name]["mean_distance"]) < 1e-9
    assert len(c3["start_distance"]) == c3["goals"] and min(c3["start_distance"]) > 0
    # the planning policies log the executed plan's EFE terms at every step; the baselines have none
    assert set(c3["efe_terms"]) == {"agent", "risk_only"} and len(c3["efe_terms"]["agent"]["risk"]) == c3["steps"]
    assert results["latency"]["presets"]["realtime"]["K"] == 64
    assert {"epistemic_right", "epistemic_left", "pass"} <= results["check5"].keys()
    assert results["check5"]["train_fraction_right_of_0"] < 0.5  # the left-half data stays mostly left
    assert results["check5"]["transitions_right"] + results["check5"]["transitions_left"] > 0


class _ShiftWorld:
    """Held-out transitions of a world whose state is written into the newest frame's first pixels (channel 0,
    row 0) and moved by a tenth of the action per step; :func:`_shift_world` makes a model that knows it."""

    def __init__(self, latent_dim: int, action_dim: int, seed: int = 0):
        self.d, self.a, self.g = latent_dim, action_dim, __import__("torch").Generator().manual_seed(seed)

    def sample(self, n, frame_stack=1, keys=None, horizon=None):
        import torch
        from tensordict import TensorDict

        x = torch.zeros(n, 3 * frame_stack, 64, 64)
        x[:, -3, 0, : self.d] = 0.3 + 0.4 * torch.rand(n, self.d, generator=self.g)
        action = torch.rand(n, self.a, generator=self.g) * 2 - 1
        nxt = x.clone()
        nxt[:, -3, 0, : self.a] += 0.1 * action
        scale = 255.0  # uint8 scale, as the buffer stores pixels (floats here, so the move is exact)
        return TensorDict({"pixels": x * scale, "action": action, "next": {"pixels": nxt * scale}}, batch_size=[n])


def _shift_world(wm, monkeypatch, bias: float = 0.0):
    """``bias``: the decoder draws the state's first value shifted by it (a systematic drawing error)."""
    import torch

    d = wm.latent_dim
    monkeypatch.setattr(wm, "posterior", lambda x: (x[:, -3, 0, :d].float() / 255.0,
                                                     torch.full((x.shape[0], d), 1e-3)))

    def transition_members(s, action):
        mean = s + 0.1 * torch.cat([action, torch.zeros(s.shape[0], d - action.shape[1])], dim=1)
        return mean.expand(len(wm.transitions), -1, -1), torch.full((len(wm.transitions), *s.shape), 1e-3)

    def decode_mean(s):
        image = torch.full((s.shape[0], 3, 64, 64), -0.5)
        image[:, 0, 0, :d] = s - 0.5
        image[:, 0, 0, 0] += bias
        return image

    monkeypatch.setattr(wm, "transition_members", transition_members)
    monkeypatch.setattr(wm, "decode_mean", decode_mean)


def test_bench_active_inference_check2_ranks_the_true_action_first_in_a_known_world(monkeypatch):
    """Check 2's harness on a model that knows the world exactly: with the goal o_{t+1}, the true action ranks
    among the best candidates in every case, by G with the latent risk and with the observation risk (both
    ranked on the same cases and draws; only what was asked for is ranked)."""
    from latentrl.agents.active_inference import ActiveInferenceAgent

    bench = _load("bench_active_inference")
    cfg = ActiveInferenceAgent.make_config("smoke", epistemic_weight=0.0, num_samples=2)
    agent = ActiveInferenceAgent(cfg, (3, 64, 64), 2)
    agent.eval()
    _shift_world(agent.world_model, monkeypatch)
    args = SimpleNamespace(seed=0, rank_risks=["latent", "observation", "observation_corrected"])
    out = bench._scorer_ranking(agent, _ShiftWorld(cfg.latent_dim, 2), args, n=20, k=200, h=1)
    assert out["risk_form"] == "latent"
    assert out["G_nonconstant_fraction_in_best_20pct"] == 1.0 and out["G_nonconstant_median_rank"] < 0.02
    assert out["observation_risk_G_fraction_in_best_20pct"] == 1.0 and out["observation_risk_G_median_rank"] < 0.02
    assert out["observation_corrected_risk_G_fraction_in_best_20pct"] == 1.0
    args.rank_risks = ["latent"]
    assert "observation_risk_G_median_rank" not in bench._scorer_ranking(agent, _ShiftWorld(cfg.latent_dim, 2),
                                                                         args, n=4, k=10, h=1)
    # a decoder that draws the state shifted by a whole action's move: the plain observation risk then prefers
    # the actions that undo the shift; the corrected form takes the decoder's error on o_t away and does not
    _shift_world(agent.world_model, monkeypatch, bias=0.1)
    args.rank_risks = ["observation", "observation_corrected"]
    out = bench._scorer_ranking(agent, _ShiftWorld(cfg.latent_dim, 2), args, n=20, k=200, h=1)
    assert out["observation_corrected_risk_G_fraction_in_best_20pct"] == 1.0
    assert out["observation_risk_G_fraction_in_best_20pct"] < 0.5


def test_latent_ranking_scores_rank_the_true_action_first_only_when_the_model_moves_toward_the_goal(monkeypatch):
    """``docs/bench_active_inference/latent_ranking.py``'s noise-free scorers on check 2's own cases
    (``bench.ranking_cases``): a model that knows the world ranks the true action first in every case by each of
    them; under one whose transition ignores the action every candidate ties with the true one (mid-rank 0.5) and
    none moves the prediction."""
    import torch

    from latentrl.agents.active_inference import ActiveInferenceAgent

    bench = _load("bench_active_inference")
    ranking = _load("latent_ranking", STUDIES / "bench_active_inference")
    cfg = ActiveInferenceAgent.make_config("smoke")
    wm = ActiveInferenceAgent(cfg, (3, 64, 64), 2).eval().world_model
    _shift_world(wm, monkeypatch)
    world = _ShiftWorld(cfg.latent_dim, 2)
    with bench.fixed_draws(3):
        first, goal, actions = bench.ranking_cases(world, 1, 40, 300, 1, 2, seed=4)
    assert torch.equal(actions[:, 0, 0], _ShiftWorld(cfg.latent_dim, 2).sample(40)["action"])  # the true one first
    assert actions.shape == (40, 301, 1, 2) and actions[:, 1:].abs().max() <= 1
    now, _ = wm.posterior(first)
    goal_mean, goal_std = wm.posterior(goal)
    scores = ranking.mean_path_scores(wm, now, goal_mean, goal_std, actions[:, :, 0])
    for name in ("risk_mean_path", "risk_expected", "latent_distance", "overlap_expected"):
        assert ranking.fraction(scores[name]) == {"fraction_in_best_20pct": 1.0, "median_rank": 0.0}, name
    assert float(scores["action_spread_in_goal_stds_median"]) > 10 > 1e-3 > float(
        scores["true_action_miss_in_goal_stds_median"])
    per_dim = scores["per_dim"]  # the true action lands on the goal in every dimension; the candidates spread it
    assert per_dim["true_action_miss_rms"].max() < 1e-3 < per_dim["candidate_spread"][:2].min()

    def blind(s, action):  # the same model, but the action changes nothing
        return s.expand(len(wm.transitions), -1, -1), torch.full((len(wm.transitions), *s.shape), 1e-3)

    monkeypatch.setattr(wm, "transition_members", blind)
    scores = ranking.mean_path_scores(wm, now, goal_mean, goal_std, actions[:, :, 0])
    assert float(scores["action_spread_in_goal_stds_median"]) == 0.0
    assert ranking.fraction(scores["risk_mean_path"])["median_rank"] == 0.5  # every candidate ties the true one


def test_goal_motion_renders_the_goal_frame_newest_and_its_still_preference_is_check3s(tmp_path):
    """``docs/bench_active_inference/goal_motion.py``: a moving stack puts the previous frame first and the goal's
    last; the place-only preference is the moment-matched mixture of the moving beliefs; end to end on a saved
    smoke model, its ``still`` run is check 3's agent row (the same goals, starts, goal belief and seeds) and its
    baselines are check 3's."""
    import torch

    bench = _load("bench_active_inference")
    motion = _load("goal_motion", STUDIES / "bench_active_inference")

    class Frames:  # each env's frame is filled with its body's x
        def set_physics_state(self, states):
            return {"pixels": states[:, :1, None, None].expand(-1, 3, 2, 2).clone()}

    newest = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    stack = motion.render_stack(Frames(), newest - torch.tensor([[1.0, 0, 0, 0]]), newest, frame_stack=3)
    assert stack[0, :, 0, 0].tolist() == [2.0] * 6 + [3.0] * 3
    means = torch.tensor([[[0.0, 1.0]], [[2.0, 1.0]]])  # [M = 2, N = 1, D = 2]
    mean, std = motion.mixture(means, torch.ones_like(means))
    assert torch.allclose(mean, torch.tensor([[1.0, 1.0]])) and torch.allclose(std.square(), torch.tensor([[2.0, 1.0]]))

    class Stacks:  # previous frame 0, newest frame 1 or 3
        def sample(self, n, frame_stack=1, keys=None):
            newest = torch.tensor([1.0, 3.0]).repeat(n // 2)[:, None, None, None].expand(n, 3, 2, 2)
            return {"pixels": torch.cat([torch.zeros_like(newest), newest], 1)}

    class Model:  # the belief's mean: each channel's value
        obs_shape = (3, 1, 1)

        def posterior(self, x):
            return x[:, :, 0, 0], torch.ones(len(x), x.shape[1])

    shift, spread = motion.data_motion(Model(), Stacks(), 2, 8, seed=0)  # moving - still: (-v, -v, -v, 0, 0, 0)
    assert torch.allclose(shift, torch.tensor([-2.0] * 3 + [0.0] * 3))
    assert torch.allclose(spread, torch.tensor([1.0] * 3 + [0.0] * 3))

    flags = ["--quick", "--data", str(tmp_path / "data"), "--seed", "2"]
    args = bench.parse_args([*flags, "--fig-dir", str(tmp_path / "figs")])
    bench.load_or_collect(args)
    torch.manual_seed(0)
    bench.save_model_file(bench.build_agent(args), {}, tmp_path / "model.pt")
    flags += ["--load-model", str(tmp_path / "model.pt")]
    out = motion.main([*flags, "--fig-dir", str(tmp_path / "motion"), "--motions", "3"])
    check3 = bench.goal_reaching(bench.load_saved_agent(bench.parse_args([*flags, "--fig-dir", str(tmp_path / "c")])),
                                 bench.load_or_collect(args)[1], args)
    runs = out["goal_reaching"]
    assert runs["still"]["final_distance"] == check3["agent"]["final_distance"]
    assert runs["random"]["final_distance"] == check3["random"]["final_distance"]
    assert runs["zero"]["final_distance"] == check3["zero"]["final_distance"]
    assert out["still"]["0.0"]["risk"] == [0.0, 0.0, 0.0]  # the goal's own still stack is the goal belief
    assert out["arriving"]["risk"][1] > 0
    assert (tmp_path / "motion" / "goal_motion.png").stat().st_size > 0  # the distance curves
    with pytest.raises(SystemExit, match="exists"):  # nothing is written over
        motion.main([*flags, "--fig-dir", str(tmp_path / "motion"), "--motions", "3"])


def test_plan_ranking_executes_every_candidate_and_reads_the_scores_order_against_the_outcomes(tmp_path):
    """``docs/bench_active_inference/plan_ranking.py``: a score that orders the candidates as their true outcomes
    has rho 1 and picks the truly best plan (percentile 0), the reverse rho -1 and the worst; end to end on a saved
    smoke model, each candidate is executed from check 3's start: doing nothing leaves the body at its start
    distance, the others move it."""
    import numpy as np
    import torch

    bench = _load("bench_active_inference")
    ranking = _load("plan_ranking", STUDIES / "bench_active_inference")
    truth = np.array([[0.3, 0.1, 0.2, 0.4], [0.5, 0.6, 0.2, 0.1]])
    right, wrong = ranking.ranking(truth * 2, truth), ranking.ranking(-truth, truth)
    assert right["median_rho"] == pytest.approx(1.0) and right["best_percentile"] == [0.0, 0.0]
    assert wrong["median_rho"] == pytest.approx(-1.0) and wrong["best_percentile"] == [1.0, 1.0]
    assert ranking.ranking(np.ones_like(truth), truth)["rho"] == [0.0, 0.0]  # a score tying all ranks nothing

    class Moves:  # a belief that is the body's position, a transition that adds the action
        def posterior(self, x):
            return x[:, :2, 0, 0].float(), torch.ones(len(x), 2)

        def transition_members(self, s, a):
            return (s + a)[None], torch.ones(1, *s.shape)

    class Transitions:
        def sample(self, n, frame_stack=1, keys=None):
            g = torch.Generator().manual_seed(n)
            now, a = torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g) - 0.5
            image = lambda p: p[:, :, None, None].expand(n, 2, 2, 2)  # noqa: E731
            return {"pixels": image(now), "action": a, "next": {"pixels": image(now + a)}}

    effect = ranking.action_effect(Moves(), Transitions(), 2, 64, seed=0)
    assert effect["true"] == pytest.approx(0.0, abs=1e-12) and effect["zero"] == pytest.approx(effect["copy"])
    assert effect["zero"] < effect["negated"] == pytest.approx(4 * effect["zero"]) and effect["other"] > effect["true"]

    flags = ["--quick", "--data", str(tmp_path / "data"), "--seed", "2"]
    args = bench.parse_args([*flags, "--fig-dir", str(tmp_path / "figs")])
    bench.load_or_collect(args)
    torch.manual_seed(0)
    bench.save_model_file(bench.build_agent(args), {}, tmp_path / "model.pt")
    out = ranking.main([*flags, "--load-model", str(tmp_path / "model.pt"), "--fig-dir", str(tmp_path / "pr"),
                        "--candidates", "4"])
    moved = np.asarray(out["true_distance"])
    np.testing.assert_allclose(moved[:, 0], out["start_distance"], atol=1e-6)  # zero actions from rest
    assert (np.abs(moved[:, 1:] - moved[:, :1]) > 1e-5).all()
    assert set(out) >= {"still", "unit_precision", "latent_distance"} and -1.0 <= out["still"]["median_rho"] <= 1.0
    assert json.loads((tmp_path / "pr" / "plan_ranking.json").read_text())["candidates"] == 4


def test_check3_over_training_reads_the_agent_row_of_both_records_and_orders_a_run_by_updates(tmp_path):
    """``docs/bench_active_inference/check3_over_training.py``: from a benchmark record the agent row of check 3
    (not the risk-only ablation), from a goal_motion.py record its still goal (check 3's agent; not the widened
    ones); a label's points in update order; a malformed point or an unknown record refuses."""
    curve = _load("check3_over_training", STUDIES / "bench_active_inference")
    row = lambda success: {"success": success, "mean_distance": 1.0 - success}  # noqa: E731
    base = {"random": row(0.04), "zero": row(0.02)}
    bench_record = tmp_path / "results.json"
    bench_record.write_text(json.dumps({"check3": {"agent": row(0.28), "risk_only": row(0.5), **base}}))
    motion_record = tmp_path / "goal_motion.json"
    motion_record.write_text(json.dumps({"goal_reaching": {"still": row(0.08), "any_motion": row(0.6),
                                                           "data_motion": row(0.7), **base}}))
    runs = curve.main(["--figure", str(tmp_path / "c3.png"), "--point", f"seed 1:13510={bench_record}",
                       "--point", f"seed 1:8260={motion_record}", "--point", f"seed 2:900={bench_record}"])
    assert [(u, r["agent"]["success"]) for u, r in runs["seed 1"]] == [(8260, 0.08), (13510, 0.28)]
    assert [u for u, _ in runs["seed 2"]] == [900] and runs["seed 2"][0][1]["zero"]["success"] == 0.02
    assert (tmp_path / "c3.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="LABEL:UPDATES=FILE"):
        curve.main(["--figure", str(tmp_path / "x.png"), "--point", f"seed 1={bench_record}"])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="neither"):
        curve.main(["--figure", str(tmp_path / "x.png"), "--point", f"a:1={tmp_path / 'other.json'}"])


def test_risk_along_paths_takes_the_shoulders_shorter_arc_and_reads_the_risks_order():
    """``docs/bench_active_inference/risk_along_paths.py``: the shoulder (unlimited) goes the shorter way round, the
    wrist directly, the poses at rest; the reading finds a risk that orders the path as the distance does, one that
    rises out of the start, and splits goals at the median start distance."""
    import math

    import numpy as np
    import torch

    paths = _load("risk_along_paths", STUDIES / "bench_active_inference")
    start = torch.tensor([[3.0, -1.0, 0.5, 0.7, 9.0], [0.2, 0.0, 0.1, 0.1, 9.0]])
    goal = torch.tensor([[-3.0, 1.0, 0.0, 0.0, 4.0], [0.6, -2.0, 0.0, 0.0, 4.0]])
    states = paths.path_states(start, goal, torch.linspace(0, 1, 5), joints=2, wrapped=(0,))
    assert states.shape == (5, 2, 5)
    # 3.0 -> -3.0 the short way crosses pi (2pi - 6 = 0.283 rad), not 0; the wrist 1 -> -1 directly through 0
    assert torch.allclose(states[2, 0, 0], torch.tensor(3.0 + (2 * math.pi - 6.0) / 2))
    assert torch.allclose(states[-1, 0, 0], torch.tensor(2 * math.pi - 3.0))  # the goal's angle, 2 pi on
    assert torch.allclose(states[2, 0, 1], torch.tensor(0.0))
    assert torch.allclose(states[:, 1, 0], torch.linspace(0.2, 0.6, 5))
    assert (states[:, :, 2:4] == 0).all() and (states[:, :, 4] == 9.0).all()  # at rest; the rest from the start

    line = np.linspace(1.0, 0.0, 6)
    # goals 0, 1 near, 2, 3 far; goal 1's arm first moves away from the goal, then toward it
    distance = np.stack([line, [1.0, 0.9, 1.1, 0.5, 0.2, 0.0], 3 * line, 3 * line], axis=1)
    risk = np.stack([line, [3.0, 4.0, 1.5, 1.2, 0.6, 0.0], [3.0, 4.0, 1.8, 1.2, 0.6, 0.0], line[::-1]], axis=1)
    reading = paths.path_reading(risk, distance, distance[0])
    # ranks of goal 1: risk (4, 5, 3, 2, 1, 0), distance (4, 3, 5, 2, 1, 0): sum of squared differences 8;
    # goal 2: two ranks swapped (2); goal 3: the risk rises all the way to the goal
    assert np.allclose(reading["rho"], [1.0, 1 - 6 * 8 / (6 * 35), 1 - 6 * 2 / (6 * 35), -1.0])
    # ties share their mean rank (many paths never climb: their climbs are all 0)
    tied = paths.spearman(np.array([[0.0], [0.0], [1.0], [2.0]]), np.array([[1.0], [2.0], [3.0], [4.0]]))
    assert tied[0] == pytest.approx(np.corrcoef([0.5, 0.5, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0])[0, 1])
    assert reading["monotone"] == [True, False, False, False]
    assert reading["first_step_falls"] == [True, False, False, False]
    assert reading["near"]["goals"] == reading["far"]["goals"] == 2
    assert reading["near"]["monotone"] == reading["near"]["first_step_falls"] == 0.5
    assert reading["far"]["monotone"] == reading["far"]["first_step_falls"] == 0.0
    # read again on the paths whose distance falls at every step (not goal 1's); the rise above the start's risk
    assert reading["distance_monotone"] == [True, False, True, True]
    assert reading["near"]["distance_monotone"] == 1 and reading["near"]["monotone_where_distance_monotone"] == 1.0
    assert reading["far"]["first_step_falls_where_distance_monotone"] == 0.0
    assert np.allclose(reading["rise"][:3], [0.0, 1 / 3, 1 / 3])  # 3 -> 4 on goals 1 and 2
    assert 1e9 < reading["rise"][3] < float("inf")  # from a zero start risk to 1: no division by zero
    # the share of the path before the risk is first 10% below the start's (goal 3's never is: the whole path)
    assert np.allclose(reading["plateau"], [0.2, 0.4, 0.4, 1.0])
    assert reading["far"]["median_plateau_where_distance_monotone"] == pytest.approx(0.7)
    assert reading["near"]["median_plateau_where_distance_monotone"] == pytest.approx(0.2)  # goal 1 left out


def test_risk_along_paths_figure_reads_each_path_relative_to_its_start(tmp_path):
    """``relative_curves``: every reading divided by its own path's start value, percentiles over the chosen paths
    only; ``plot_paths`` draws the near and far halves."""
    import numpy as np

    paths = _load("risk_along_paths", STUDIES / "bench_active_inference")
    # three paths of three poses; the third (excluded) would pull every percentile up
    values = [[2.0, 1.0, 0.0], [4.0, 6.0, 0.0], [1.0, 9.0, 9.0]]
    out = {"risk": values, "distance": values, "points": 3, "start_distance": [0.1, 0.5, 0.3],
           "distance_monotone": [True, True, False],
           **{name: {"values": values} for name in ("latent_distance", "observation_risk", "pixel_distance")}}
    curves = paths.relative_curves(out, np.array([True, True, False]))
    assert set(curves) == set(paths.READINGS)
    np.testing.assert_allclose(curves["risk"][:, 1], [1.0, 1.0, 0.0])  # medians of (1, 0.5, 0) and (1, 1.5, 0)
    np.testing.assert_allclose(curves["pixel_distance"][1], [0.75, 1.0, 1.25])  # 25th, 50th, 75th at pose 1
    paths.plot_paths(out, tmp_path / "paths.png")
    assert (tmp_path / "paths.png").stat().st_size > 10_000


def test_latent_ranking_state_probe_reads_what_the_belief_knows_against_what_the_action_moves():
    """``latent_ranking.state_probe`` / ``action_effect`` on a linear world with a known action matrix: the action's
    effect on the next state is ``sqrt(sum_a B_ap^2 / 3)`` per component; a belief holding the whole state reads
    position and velocity (R^2 near 1, errors far below the action's effect), one holding only the position reads no
    velocity (R^2 near 0, an error of the velocity's spread)."""
    import torch
    from tensordict import TensorDict

    ranking = _load("latent_ranking", STUDIES / "bench_active_inference")
    b_matrix = torch.tensor([[0.0, 0.0, 0.003, 0.0], [0.0, 0.0, 0.0, 0.006]])  # a moves the velocity only

    class Linear:  # "pixels" are the state itself, so an embedding chooses what of it the belief holds
        def __init__(self, seed, keep=0.9, noise=0.0):  # next = keep * state + a B + noise
            self.gen, self.keep, self.noise = torch.Generator().manual_seed(seed), keep, noise

        def __len__(self):
            return 10**6

        def sample(self, n, frame_stack=1, keys=None):
            state = torch.randn(n, 4, generator=self.gen) * torch.tensor([1.0, 1.0, 0.01, 0.01])  # slow, as there
            action = torch.rand(n, 2, generator=self.gen) * 2 - 1
            noise = self.noise * torch.randn(n, 4, generator=self.gen) * torch.tensor([1.0, 1.0, 0.01, 0.01])
            nxt = self.keep * state + action @ b_matrix + noise
            return TensorDict({"pixels": state, "physics": state, "action": action,
                               "next": {"pixels": nxt, "physics": nxt}}, batch_size=[n])

    effect = ranking.action_effect(Linear(0), transitions=2000)
    torch.testing.assert_close(effect, (b_matrix.square().sum(0) / 3).sqrt(), atol=1e-4, rtol=1e-4)
    # the next state mostly noise: a probe read against the wrong step would fail
    whole = ranking.state_probe(lambda x: x, Linear(1, 0.2, 1.0), Linear(2, 0.2, 1.0), 1, transitions=3000,
                                updates=600, cases=500)
    position_only = ranking.state_probe(lambda x: x[:, :2], Linear(1, 0.2, 1.0), Linear(2, 0.2, 1.0), 1,
                                        transitions=3000, updates=600, cases=500)
    assert whole["position_r2"] > 0.95 and whole["velocity_r2"] > 0.95, whole
    assert whole["action_effect_on_next_velocity"] == pytest.approx(float((0.003**2 / 3 + 0.006**2 / 3) / 2) ** 0.5,
                                                                    rel=0.15)  # fitted through the noise
    assert whole["action_effect_on_next_position"] < 0.05
    assert position_only["position_r2"] > 0.95 and abs(position_only["velocity_r2"]) < 0.1, position_only
    assert position_only["velocity_rmse_over_action_effect"] > 2 > 0.5 > whole["velocity_rmse_over_action_effect"]


def test_latent_ranking_state_probe_reads_an_unlimited_joint_as_a_wrapped_angle():
    """Reacher's shoulder winds past +-pi (the recorded angle reaches +-13 rad): ``state_probe(angles=(0,))``
    predicts its sine and cosine and scores the wrapped difference, so a belief that knows the arm's pose but not
    how often it has wound reads as knowing it; read as a plain number the same belief reads as not."""
    import math

    import torch
    from tensordict import TensorDict

    ranking = _load("latent_ranking", STUDIES / "bench_active_inference")
    truth = torch.tensor([[0.5 + 4 * math.pi, 1.0], [3.0, -2.0]])  # the first recorded two laps on
    wound = torch.tensor([[math.sin(0.5), math.cos(0.5), 1.0],
                          [math.sin(3.0 - 2 * math.pi), math.cos(3.0 - 2 * math.pi), -1.0]])
    err, spread = ranking.component_errors(wound, truth, (0,))
    torch.testing.assert_close(err, torch.tensor([0.0, 0.5]), atol=1e-6, rtol=0)  # laps dropped; (0 + 1) / 2
    assert spread[0] == pytest.approx(float(torch.tensor([0.5, 3.0]).var()), rel=1e-5)  # the wrapped spread
    assert ranking.probe_targets(truth, (0,)).shape == (2, 3)

    class Winding:  # an angle that winds, a position, their velocities; the "pixels" hold the angle's sin, cos
        def __init__(self, seed):
            self.gen = torch.Generator().manual_seed(seed)

        def __len__(self):
            return 10**6

        def sample(self, n, frame_stack=1, keys=None):
            state = torch.rand(n, 4, generator=self.gen) * torch.tensor([8 * math.pi, 2, 2, 2]) \
                - torch.tensor([4 * math.pi, 1, 1, 1])
            action = torch.rand(n, 2, generator=self.gen) * 2 - 1
            nxt = state + torch.cat([0.1 * state[:, 2:], action], 1)
            seen = torch.cat([state[:, :1].sin(), state[:, :1].cos(), state[:, 1:]], 1)
            return TensorDict({"pixels": seen, "physics": state, "action": action,
                               "next": {"pixels": seen, "physics": nxt}}, batch_size=[n])

    wrapped = ranking.state_probe(lambda x: x, Winding(1), Winding(2), 1, transitions=3000, updates=800,
                                  cases=500, angles=(0,))
    plain = ranking.state_probe(lambda x: x, Winding(1), Winding(2), 1, transitions=3000, updates=800, cases=500)
    assert wrapped["position_r2"] > 0.9 and wrapped["velocity_r2"] > 0.9, wrapped
    assert plain["position_r2"] < 0.6, plain  # the lap count cannot be read: half the position's R^2 is lost


def test_latent_ranking_runs_on_a_saved_model_and_ranks_check2s_own_cases(tmp_path):
    """``latent_ranking.py`` end to end on a saved smoke model and collected point_mass data: its benchmark row is
    check 2 on the same model and cases, the noise-free scorers and both probes are read on those cases, and the
    record is written."""
    import torch

    bench = _load("bench_active_inference")
    ranking = _load("latent_ranking", STUDIES / "bench_active_inference")
    flags = ["--quick", "--data", str(tmp_path / "data"), "--fig-dir", str(tmp_path / "figs"), "--seed", "2"]
    args = bench.parse_args(flags)
    train, heldout = bench.load_or_collect(args)
    torch.manual_seed(0)
    bench.save_model_file(bench.build_agent(args), {}, tmp_path / "model.pt")
    out = ranking.main([*flags, "--load-model", str(tmp_path / "model.pt")], probe_transitions=1000, probe_updates=20)
    args = bench.parse_args([*flags, "--load-model", str(tmp_path / "model.pt"), "--rank-risks", "latent"])
    assert out["G_benchmark"] == bench.scorer_ranking(bench.load_saved_agent(args), heldout, args)
    for name in ("risk_mean_path", "risk_expected", "latent_distance", "latent_inverse_probe",
                 "encoder_features_inverse_probe"):
        assert 0.0 <= out[name]["fraction_in_best_20pct"] <= 1.0, name
    assert out["latent_inverse_probe"]["action_mse"] != out["encoder_features_inverse_probe"]["action_mse"]
    for probe in ("state_probe", "state_probe_pixels"):  # the belief's, and the pooled frames' for reference
        assert out[probe]["action_effect_on_next_velocity"] > 0 and "velocity_r2" in out[probe]
    assert out["state_probe"]["velocity_r2"] != out["state_probe_pixels"]["velocity_r2"]
    assert json.loads((tmp_path / "figs" / "latent_ranking.json").read_text())["cases"] == args.rank_cases


def test_inverse_ceiling_reads_frames_in_order_and_the_physics_fit_recovers_the_action(tmp_path):
    """``docs/bench_active_inference/inverse_ceiling.py``: the network's input is frames t-1, t, t+1 (o_t's stack
    and o_{t+1}'s newest frame) with a_t; the candidates' ranking puts an exact prediction first; on real
    point_mass transitions the least-squares fit from the physics state at t and t+1 recovers a_t (the motion
    carries the action), and a run writes its curve."""
    import torch
    from tensordict import TensorDict

    bench = _load("bench_active_inference")
    ceiling = _load("inverse_ceiling", STUDIES / "bench_active_inference")

    class Stacks:  # frame k is filled with the value k; o_t = (k - 1, k), o_{t+1} = (k, k + 1), a_t = k
        def sample(self, n, frame_stack=1, keys=None):
            k = torch.arange(1, n + 1, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4)
            return TensorDict({"pixels": torch.cat([k - 1, k], 1), "action": k[:, 0, 0, :2].float(),
                               "physics": torch.zeros(n, 4), "next": {"pixels": torch.cat([k, k + 1], 1),
                                                                     "physics": torch.zeros(n, 4)}}, batch_size=[n])

    frames, actions, physics = ceiling.frames_and_actions(Stacks(), 5)
    k = torch.arange(1, 6)
    for i, offset in enumerate((-1, 0, 1)):
        assert torch.equal(frames[:, 3 * i : 3 * i + 3].amax((1, 2, 3)).long(), k + offset)
    assert torch.equal(actions[:, 0].long(), k) and physics.shape == (5, 8)
    truth = torch.rand(50, 2) * 2 - 1
    assert bench.rank_summary(ceiling.ranks(truth, truth, 100, seed=0))["fraction_in_best_20pct"] == 1.0
    assert bench.rank_summary(ceiling.ranks(-truth.sign(), truth.sign() * 0.9, 100, seed=0))["median_rank"] > 0.9

    args = bench.parse_args(["--quick", "--data", str(tmp_path / "data"), "--fig-dir", str(tmp_path / "figs")])
    for folder, episodes, seed in (("train", 4, 0), ("heldout", 2, 1)):
        bench.collect(args, episodes, seed).save(tmp_path / "data" / folder)
    record = ceiling.main(["--data", str(tmp_path / "data"), "--updates", "4", "--eval-every", "2", "--cases", "16",
                           "--candidates", "50", "--out", str(tmp_path / "ceiling.json")])
    assert record["physics_least_squares"]["fraction_in_best_20pct"] == 1.0
    assert record["physics_least_squares"]["action_mse"] < 0.01 < record["mean_action"]["action_mse"]
    assert [row["update"] for row in record["curve"]] == [0, 2, 4]
    assert json.loads((tmp_path / "ceiling.json").read_text())["curve"][-1]["update"] == 4
    ranked = {"G_benchmark": {"G_nonconstant_fraction_in_best_20pct": 0.3}, "latent_inverse_probe": {
        "fraction_in_best_20pct": 0.25}}
    (tmp_path / "ranked.json").write_text(json.dumps(ranked))
    drawn = ceiling.main(["--figure", str(tmp_path / "c.png"), "--records", f"cnn={tmp_path / 'ceiling.json'}",
                          "--world-models", f"900={tmp_path / 'ranked.json'}",
                          f"two frames@500={tmp_path / 'ranked.json'}"])
    assert (tmp_path / "c.png").stat().st_size > 0
    assert [u for u, _ in drawn["curves"]["cnn"]] == [0, 2, 4]
    assert drawn["world_models"] == {"world model": [(900, 0.3, 0.25)], "two frames": [(500, 0.3, 0.25)]}
    # the state figure takes each series' latest record that has a state probe
    probe = {f"{part}_{what}": value for part in ("position", "velocity")
             for what, value in (("r2", 0.5), ("rmse_over_action_effect", 2.0))}
    (tmp_path / "probed.json").write_text(json.dumps({**ranked, "state_probe": probe}))
    (tmp_path / "later.json").write_text(json.dumps({**ranked, "state_probe": {**probe, "velocity_r2": -0.1}}))
    drawn = ceiling.main(["--figure", str(tmp_path / "c.png"), "--state-figure", str(tmp_path / "s.png"),
                          "--world-models", f"1200={tmp_path / 'later.json'}", f"900={tmp_path / 'probed.json'}",
                          f"1500={tmp_path / 'ranked.json'}", f"two frames@500={tmp_path / 'probed.json'}"])
    assert (tmp_path / "s.png").stat().st_size > 0
    assert drawn["state"]["world model"]["updates"] == 1200 and drawn["state"]["world model"]["velocity_r2"] == -0.1
    assert drawn["state"]["two frames"]["updates"] == 500
    alone = ceiling.main(["--state-figure", str(tmp_path / "s2.png"),
                          "--world-models", f"900={tmp_path / 'probed.json'}"])
    assert set(alone) == {"state"} and (tmp_path / "s2.png").stat().st_size > 0


def test_bench_active_inference_quick_never_defaults_to_the_docs_page(tmp_path, monkeypatch):
    """A ``--quick`` run without ``--out`` / ``--fig-dir`` writes under the temp dir, not over the docs' page,
    figures and results.json; given paths and a full run's defaults are unchanged."""
    bench = _load("bench_active_inference")
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    docs = bench.ROOT / "docs"
    args = bench.parse_args(["--quick"])
    assert Path(args.fig_dir).parent == tmp_path and Path(args.out) == Path(args.fig_dir) / "page.md"
    args = bench.parse_args(["--quick", "--fig-dir", str(tmp_path / "f")])
    assert args.out == str(tmp_path / "f" / "page.md")
    args = bench.parse_args([])
    assert (Path(args.out), Path(args.fig_dir)) == (docs / "bench_active_inference.md", docs / "bench_active_inference")


def test_bench_active_inference_train_seed_replicates_the_model_alone(tmp_path):
    """``--train-seed`` reseeds the model's initialisation and training only: the same data, held-out cases and
    copy baseline under every train seed, another model under another seed, the same model under the same one."""
    import json

    bench = _load("bench_active_inference")

    def run(name, *extra):
        figs = tmp_path / name
        common = ["--quick", "--checks", "1", "--out", str(tmp_path / f"{name}.md"), "--fig-dir", str(figs)]
        assert bench.main([*common, *extra]) == 0
        return json.loads((figs / "results.json").read_text())

    a, b, again = run("a", "--train-seed", "1"), run("b", "--train-seed", "2"), run("again", "--train-seed", "1")
    assert a["check1"]["copy_frame_mse"] == b["check1"]["copy_frame_mse"] == again["check1"]["copy_frame_mse"]
    assert a["train"]["free_energy"] == again["train"]["free_energy"]
    assert a["check1"]["model_mse"] == again["check1"]["model_mse"]
    assert a["train"]["free_energy"] != b["train"]["free_energy"]
    assert a["check1"]["model_mse"] != b["check1"]["model_mse"]


def test_bench_active_inference_goal_reaching_plans_the_ablation_with_the_agents_risk(tmp_path):
    """Check 3 under ``--set risk=observation``: the risk-only ablation plans toward the same goal frame with the
    same observation-space risk (it once failed to build: the goal frame was not passed on), without the epistemic
    term; under the default latent risk both rows say so."""
    import json

    bench = _load("bench_active_inference")
    for risk in ("observation", "latent"):
        figs = tmp_path / risk
        flags = ["--quick", "--checks", "3", "--set", f"risk={risk}", "--out", str(tmp_path / f"{risk}.md"),
                 "--fig-dir", str(figs)]
        assert bench.main(flags) == 0
        check3 = json.loads((figs / "results.json").read_text())["check3"]
        assert check3["agent"]["risk"] == check3["risk_only"]["risk"] == risk
        assert check3["risk_only"]["epistemic_weight"] == 0.0 < check3["agent"]["epistemic_weight"]


def test_bench_active_inference_resume_trains_a_saved_model_on(tmp_path):
    """``--load-model m --resume --save-model m`` continues the model, its Adam state and its training record:
    6 + 6 quick updates give a 12-update record with one curve and Adam at step 12; --resume alone is refused."""
    import json

    import torch

    bench = _load("bench_active_inference")
    model, figs = tmp_path / "model.pt", tmp_path / "figs"
    common = ["--quick", "--checks", "1", "--out", str(tmp_path / "r.md"), "--fig-dir", str(figs)]
    assert bench.main([*common, "--save-model", str(model)]) == 0
    first = torch.load(model, weights_only=True)
    assert bench.main([*common, "--load-model", str(model), "--resume", "--save-model", str(model)]) == 0
    saved = torch.load(model, weights_only=True)
    record = saved["train"]
    assert record["updates"] == 12 and record["free_energy_steps"] == list(range(1, 13))
    assert record["free_energy"][:6] == first["train"]["free_energy"] and record["resumed_at"] == [6]
    # the largest gradient norm of each log window (one update each in --quick), kept across the resume
    assert record["grad_norm_steps"] == list(range(1, 13))
    assert record["grad_norm_max"][:6] == first["train"]["grad_norm_max"]
    assert all(n > 0 for n in record["grad_norm_max"])
    assert "gradient norm before clipping (each log window's largest): median" in (tmp_path / "r.md").read_text()
    assert record["seconds"] > first["train"]["seconds"]
    steps = {int(state["step"]) for state in saved["optimizer"]["state"].values()}
    assert steps == {12}  # Adam went on from the saved moments, not from a fresh optimizer
    assert any(not torch.equal(a, saved["agent"][k]) for k, a in first["agent"].items())  # it trained on
    assert json.loads((figs / "results.json").read_text())["train"]["updates"] == 12
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(SystemExit):
        bench.parse_args(["--resume", "--load-model", str(model)])
    # a resume at another learning rate trains at that rate (the saved Adam state holds the preset's)
    assert bench.main([*common, "--set", "lr=0.0002", "--load-model", str(model), "--resume",
                       "--save-model", str(model)]) == 0
    assert {g["lr"] for g in torch.load(model, weights_only=True)["optimizer"]["param_groups"]} == {0.0002}


def test_bench_active_inference_records_the_inverse_term_across_a_resume(tmp_path):
    """``--set inverse_weight=W``: the training record keeps the inverse-dynamics error at every logged update beside
    the free energy, continued by ``--resume``; a run without the term records none."""
    import torch

    bench = _load("bench_active_inference")
    model = tmp_path / "model.pt"
    common = ["--quick", "--checks", "1", "--out", str(tmp_path / "r.md"), "--fig-dir", str(tmp_path / "figs"),
              "--set", "inverse_weight=1000"]
    assert bench.main([*common, "--save-model", str(model)]) == 0
    first = torch.load(model, weights_only=True)["train"]
    assert len(first["inverse"]) == len(first["free_energy"]) == 6 and all(v > 0 for v in first["inverse"])
    assert bench.main([*common, "--load-model", str(model), "--resume", "--save-model", str(model)]) == 0
    record = torch.load(model, weights_only=True)["train"]
    assert len(record["inverse"]) == 12 and record["inverse"][:6] == first["inverse"]
    assert bench.main([*common[:-2], "--save-model", str(tmp_path / "plain.pt")]) == 0
    assert "inverse" not in torch.load(tmp_path / "plain.pt", weights_only=True)["train"]


def test_pretrain_inverse_trains_the_encoder_alone_and_the_bench_resumes_from_update_0(tmp_path):
    """``docs/bench_active_inference/inverse_term/pretrain_inverse.py``: the inverse-dynamics error alone trains the
    encoder, the posterior head and the inverse head, and nothing else (the transition, decoder and reward head stay
    as built); its file is one ``bench_active_inference.py --resume`` trains on from update 0; it writes over no
    file."""
    import torch

    bench = _load("bench_active_inference")
    pretrain = _load("pretrain_inverse", STUDIES / "bench_active_inference" / "inverse_term")
    args = bench.parse_args(["--quick", "--data", str(tmp_path / "data"), "--fig-dir", str(tmp_path / "figs")])
    for folder, episodes, seed in (("train", 4, 0), ("heldout", 2, 1)):
        bench.collect(args, episodes, seed).save(tmp_path / "data" / folder)
    model, record = tmp_path / "pre.pt", tmp_path / "pre.json"
    common = ["--data", str(tmp_path / "data"), "--inverse-weight", "1000", "--preset", "smoke", "--heldout", "32",
              "--seed", "3"]
    pretrain.main([*common, "--updates", "4", "--log-every", "2", "--save-model", str(model), "--record", str(record)])
    curves = json.loads(record.read_text())
    assert curves["updates"] == [2, 4] and len(curves["train"]) == len(curves["heldout"]) == 2
    assert curves["mean_action_heldout"] > 0
    torch.manual_seed(3)
    fresh = bench.build_agent(bench.parse_args(["--preset", "smoke", "--set", "inverse_weight=1000"]))
    saved = torch.load(model, weights_only=True)
    assert saved["train"] == {}
    changed = {name.split(".")[1] for name, value in fresh.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, saved["agent"][name])}
    assert changed == {"encoder", "posterior_head", "inverse_head"}
    with pytest.raises(SystemExit):  # an existing file is never written over
        pretrain.main([*common, "--updates", "1", "--save-model", str(model), "--record", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
    # stopped by --seconds, the partial window it stopped in is logged (here the first update alone)
    pretrain.main([*common, "--updates", "10", "--log-every", "5", "--seconds", "0",
                   "--save-model", str(tmp_path / "short.pt"), "--record", str(tmp_path / "short.json")])
    assert json.loads((tmp_path / "short.json").read_text())["updates"] == [1]
    run = ["--quick", "--checks", "1", "--out", str(tmp_path / "r.md"), "--fig-dir", str(tmp_path / "figs"),
           "--set", "inverse_weight=1000"]
    assert bench.main([*run, "--load-model", str(model), "--resume", "--save-model", str(tmp_path / "m.pt")]) == 0
    assert torch.load(tmp_path / "m.pt", weights_only=True)["train"]["updates"] == 6
    drawn = pretrain.main(["--figure", str(tmp_path / "f.png"), "--pretrained", f"a={record}",
                           "--joint", f"b={tmp_path / 'm.pt'}"])
    assert (tmp_path / "f.png").stat().st_size > 0
    held = [h / curves["mean_action_heldout"] for h in curves["heldout"]]
    assert drawn["pretrained"]["a"] == list(zip([2, 4], held, strict=True))
    assert [u for u, _ in drawn["joint"]["b"]] == [1, 2, 3, 4, 5, 6]


def test_bench_active_inference_saves_the_model_while_training(tmp_path, monkeypatch):
    """``--save-every S`` writes the ``--save-model`` file (with the record so far) every S seconds of training, so a
    stopped run keeps its updates; 0 writes it only at the end."""
    bench = _load("bench_active_inference")
    saved = []
    real_save = bench.save_model_file
    monkeypatch.setattr(bench, "save_model_file",
                        lambda agent, record, path: (saved.append(record["updates"]), real_save(agent, record, path)))
    common = ["--quick", "--checks", "1", "--out", str(tmp_path / "r.md"), "--fig-dir", str(tmp_path / "figs"),
              "--save-model", str(tmp_path / "m.pt")]
    assert bench.main([*common, "--save-every", "1e-9"]) == 0
    assert saved == [1, 2, 3, 4, 5, 6, 6]  # each log window (one update with --quick), then the final file
    saved.clear()
    assert bench.main([*common, "--save-every", "0"]) == 0
    assert saved == [6]


def test_bench_active_inference_latency_only_needs_no_data_and_no_training(tmp_path, monkeypatch):
    """``--checks latency`` without a model file times the untrained agent on ``--device``: nothing is collected
    (a lent GPU machine cannot render dm_control) and nothing trained; the page says so."""
    import json

    bench = _load("bench_active_inference")

    def no_data(args):
        raise AssertionError("a latency-only run collected data")

    monkeypatch.setattr(bench, "load_or_collect", no_data)
    monkeypatch.setattr(bench, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("it trained")))
    figs = tmp_path / "f"
    assert bench.main(["--quick", "--checks", "latency", "--device", "cpu", "--fig-dir", str(figs)]) == 0
    results = json.loads((figs / "results.json").read_text())
    assert results["untrained"] and "train" not in results and results["latency"]["device"] == "cpu"
    assert set(results["latency"]["presets"]) == {"small", "realtime"}
    page = (figs / "page.md").read_text()
    assert "Data: none (a latency-only run)" in page and "untrained weights" in page
    assert "free_energy.png" not in page
    with pytest.raises(SystemExit):  # the checks that read held-out data run on the CPU only
        bench.parse_args(["--checks", "1,latency", "--device", "cuda"])


def test_bench_active_inference_resume_with_a_new_canvas_keeps_each_parameters_adam_state(tmp_path):
    """A conv-decoder model resumed with ``--set decoder_canvas=add`` gains a parameter in the middle of the
    parameter list; the file's Adam moments still go to the parameters they belong to (mapped by name, not by
    index), the canvas starts without state, and the decoder decodes as before until trained."""
    import torch

    bench = _load("bench_active_inference")
    model = tmp_path / "model.pt"
    common = ["--quick", "--checks", "1", "--out", str(tmp_path / "r.md"), "--fig-dir", str(tmp_path / "f"),
              "--set", "decoder=conv"]
    assert bench.main([*common, "--save-model", str(model)]) == 0
    saved = torch.load(model, weights_only=True)
    plain = bench.build_agent(bench.parse_args(common))
    bench.load_model_file(plain, model, optimizer=True)
    agent = bench.build_agent(bench.parse_args([*common, "--set", "decoder_canvas=add"]))
    bench.load_model_file(agent, model, optimizer=True)
    adam, plain_adam = agent.optimizers()["model"], plain.optimizers()["model"]
    params, plain_params = dict(agent.named_parameters()), dict(plain.named_parameters())
    assert len(params) == len(plain_params) + 1
    for name, p in plain_params.items():  # every old parameter has exactly its own moments
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(adam.state[params[name]][key], plain_adam.state[p][key]), name
    assert params["world_model.decoder.canvas"] not in adam.state
    with torch.no_grad():
        s = torch.randn(3, agent.config.latent_dim)
        assert torch.equal(agent.world_model.decoder(s), plain.world_model.decoder(s))
    # and the resume itself trains the canvas on from there
    assert bench.main([*common, "--set", "decoder_canvas=add", "--load-model", str(model), "--resume",
                       "--save-model", str(model)]) == 0
    resumed = torch.load(model, weights_only=True)
    assert resumed["agent"]["world_model.decoder.canvas"].abs().max() > 0
    assert resumed["train"]["updates"] == 2 * saved["train"]["updates"]


def test_bench_active_inference_reads_a_model_file_saved_without_a_training_curve(tmp_path):
    """``--load-model`` of a file holding the agent and only an update count (a model trained on elsewhere) runs
    the checks and reports no training row, instead of failing on the missing curve."""
    import json

    import torch

    bench = _load("bench_active_inference")
    agent = bench.build_agent(bench.parse_args(["--quick", "--fig-dir", str(tmp_path / "f")]))
    model = tmp_path / "model.pt"
    torch.save({"agent": agent.state_dict(), "train": {"updates": 7}}, model)
    out, figs = tmp_path / "report.md", tmp_path / "figs"
    assert bench.main(["--quick", "--load-model", str(model), "--out", str(out), "--fig-dir", str(figs)]) == 0
    results = json.loads((figs / "results.json").read_text())
    assert results["loaded_train"] == {"updates": 7} and "train" not in results
    assert "check1" in results and "free energy, smoothed" not in out.read_text()


def test_rewritten_benchmark_pages_keep_their_hand_written_part(tmp_path):
    from latentrl.training.logger import HAND_WRITTEN, write_report_page

    page = tmp_path / "bench.md"
    write_report_page(page, "# Bench\n\n| old | 1 |")
    assert page.read_text() == "# Bench\n\n| old | 1 |\n"  # a page without a hand-written part: replaced
    page.write_text(page.read_text() + f"\n{HAND_WRITTEN}\n\n## Reading\n\nold is slow.\n")
    write_report_page(page, "# Bench\n\n| new | 2 |\n")
    text = page.read_text()
    assert text.startswith("# Bench\n\n| new | 2 |\n") and "| old |" not in text
    assert text.endswith(f"{HAND_WRITTEN}\n\n## Reading\n\nold is slow.\n")
    write_report_page(page, "# Bench\n\n| newer | 3 |")  # again: kept once, not twice
    assert page.read_text().count("## Reading") == 1 and not list(tmp_path.glob(".*.tmp"))


def test_bench_stamo_checkpoint_keeps_its_autoencoder_settings(tmp_path):
    """``bench_stamo.py train`` stores the settings it trained with; a resume or an eval with a contradicting flag is
    refused instead of loading the weights into another architecture, and a checkpoint from before the settings
    were stored reads as what it was trained with (learned queries, no shift)."""
    import argparse

    import torch

    bench = _load("bench_stamo")
    g = torch.Generator().manual_seed(0)
    torch.save({"pixels": torch.randint(0, 256, (5, 4, 3, 64, 64), dtype=torch.uint8, generator=g)},
               tmp_path / "episodes.pt")
    common = ["--out-dir", str(tmp_path), "--quick"]
    bench.main(["train", *common, "--sigma-shift", "2", "--compression", "queries"])
    state = torch.load(tmp_path / "stamo_wm.pt", weights_only=True)
    assert state["config"] == {"preset": "smoke", "sigma_shift": 2.0, "compression": "queries"}
    for flag in (["--sigma-shift", "3"], ["--compression", "transposed"]):
        with pytest.raises(SystemExit, match="was trained with"):
            bench.main(["train", *common, "--updates", "30", *flag])
    args = argparse.Namespace(out_dir=str(tmp_path), preset="smoke", sample_steps=2, sigma_shift=None, compression=None)
    agent = bench.load_model(args)
    assert (agent.config.sigma_shift, agent.config.compression) == (2.0, "queries")
    with pytest.raises(SystemExit, match="--preset smoke"):
        bench.load_model(argparse.Namespace(**{**vars(args), "preset": "small"}))
    del state["config"]  # an old checkpoint
    assert bench.saved_config(state) == {"sigma_shift": 1.0, "compression": "queries"}


def test_bench_stamo_train_resumes_its_checkpoint_and_refuses_a_missing_gpu(tmp_path):
    """A second ``train`` continues the checkpoint (weights, AdamW moments, record) to ``--updates`` instead of
    starting over; checkpoints are renamed into place (no temporary file left); ``--device cuda`` on a machine
    without CUDA is refused before anything is read or written."""
    import torch

    bench = _load("bench_stamo")
    g = torch.Generator().manual_seed(0)
    torch.save({"pixels": torch.randint(0, 256, (5, 4, 3, 64, 64), dtype=torch.uint8, generator=g)},
               tmp_path / "episodes.pt")
    common = ["--out-dir", str(tmp_path), "--quick"]
    bench.main(["train", *common])  # --quick: 20 updates
    first = torch.load(tmp_path / "stamo_wm.pt", weights_only=True)
    bench.main(["train", *common[:2], "--preset", "smoke", "--updates", "30", "--sample-steps", "2"])
    second = torch.load(tmp_path / "stamo_wm.pt", weights_only=True)
    assert (first["updates"], second["updates"]) == (20, 30)
    assert second["history"][:20] == first["history"] and len(second["history"]) == 30
    assert {int(s["step"]) for s in second["optimizer"]["state"].values()} == {30}
    assert all(t.device.type == "cpu" for t in second["world_model"].values())
    assert not list(tmp_path.glob(".*.tmp"))
    timing = json.loads((tmp_path / "train_timing.json").read_text())
    assert timing["device"] == "cpu" and timing["updates"] == 30
    if not torch.cuda.is_available():
        (tmp_path / "stamo_wm.pt").unlink()
        with pytest.raises(SystemExit):
            bench.main(["train", *common, "--device", "cuda"])
        assert not (tmp_path / "stamo_wm.pt").exists()


def test_bench_stamo_task_probe_targets(tmp_path):
    """The state probe's targets per task: a wrapping joint as (sin, cos) and read back through atan2, the others
    as they are; differences wrap only for wrapping joints; cheetah's forward position (qpos 0) is not a target;
    eval refuses a ``--task`` that contradicts the collected data."""
    import math

    import torch

    bench = _load("bench_stamo")
    cheetah = bench.TASKS["cheetah-run"]
    physics = torch.zeros(3, 18, dtype=torch.float64)
    physics[:, 0] = torch.tensor([5.0, -7.0, 100.0])  # rootx: invisible to a tracking camera
    physics[:, 2] = torch.tensor([3.0, -3.0, 0.5])  # rooty (pitch), past +-pi after a flip
    physics[:, 3] = torch.tensor([2.0, -2.0, 0.1])  # bthigh (beyond its range: only the arithmetic is tested)
    q = cheetah.coords(physics)
    assert q.shape == (3, 8) and not torch.isin(physics[:, 0].float(), q).any()
    f = cheetah.features(q)
    assert f.shape == (3, 9) and cheetah.feature_names()[:3] == ["rootz", "sin rooty", "cos rooty"]
    assert torch.allclose(cheetah.from_features(f), q, atol=1e-6)
    d = cheetah.difference(q[0], q[1])
    assert math.isclose(float(d[1]), 6.0 - 2 * math.pi, abs_tol=1e-5)  # pitch 3 -> -3 is a 0.28 rad turn
    assert math.isclose(float(d[2]), 4.0, abs_tol=1e-6)  # a leg joint does not wrap
    reacher = bench.TASKS["reacher-easy"]
    assert reacher.feature_names() == ["sin q1", "cos q1", "sin q2", "cos q2"]
    assert reacher.difference(torch.tensor([3.0, 3.0]), torch.tensor([-3.0, 0.0])).tolist() == pytest.approx(
        [6.0 - 2 * math.pi, 3.0])
    torch.save({"pixels": torch.zeros(5, 4, 3, 64, 64, dtype=torch.uint8), "task": "cheetah-run"},
               tmp_path / "episodes.pt")
    with pytest.raises(SystemExit, match="holds cheetah-run episodes"):
        bench.main(["eval", "--out-dir", str(tmp_path), "--task", "reacher-easy"])


def test_gpu_checks_script_dry_run_on_the_cpu(tmp_path):
    """``scripts/gpu_checks.sh`` with ``DEVICE=cpu QUICK=1`` runs the open issues' GPU parts at the smallest sizes:
    every command parses and writes its results, so a typo there never costs a lent GPU's few minutes."""
    import json
    import os
    import subprocess

    out = tmp_path / "gpu_out"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PARTS": "open", "OUT": str(out)}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh")], cwd=SCRIPTS.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a part failed: 0" in proc.stdout
    latency = json.loads((out / "bench_ai_latency" / "results.json").read_text())["latency"]
    assert set(latency["presets"]) == {"paper", "small", "realtime"} and latency["device"] == "cpu"
    rows = json.loads((out / "bench_learner_open_paper.json").read_text())["rows"]
    assert {r["agent"] for r in rows if "updates_per_s" in r} == {"active_inference", "stamo", "pv_rnn"}
    rows = json.loads((out / "bench_learner_stamo_small.json").read_text())["rows"]
    assert [r["agent"] for r in rows if "updates_per_s" in r] == ["stamo"]


def test_gpu_checks_training_parts_dry_run_on_the_cpu(tmp_path):
    """``PARTS=train`` (issues 14 and 16's training on a lent GPU) with ``DEVICE=cpu QUICK=1``: tiny data made on
    the spot, StaMo's autoencoder and the reacher world model each trained and their files copied to $OUT."""
    import os
    import subprocess

    import torch

    out = tmp_path / "gpu_out"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PARTS": "train", "OUT": str(out), "MUJOCO_GL": "egl"}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh")], cwd=SCRIPTS.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a part failed: 0" in proc.stdout
    assert torch.load(out / "stamo_wm.pt", weights_only=True)["updates"] == 20
    assert json.loads((out / "stamo_train_timing.json").read_text())["device"] == "cpu"
    record = torch.load(out / "ai_reacher_gpu.pt", weights_only=True)["train"]
    assert record["updates"] == 6 and (out / "quick_ai_data" / "train").is_dir()


def test_gpu_checks_point_mass_part_dry_run_on_the_cpu(tmp_path):
    """``PARTS=pm`` (issue 14's point_mass model on a lent GPU) with ``DEVICE=cpu QUICK=1``: leg A trains from
    scratch, leg B resumes it at lr 1e-4 (its record continues A's updates), both files in $OUT; without
    AI_PM_DATA outside the dry run the part fails with a clear line instead of running."""
    import os
    import subprocess

    import torch

    out = tmp_path / "gpu_out"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PARTS": "pm", "OUT": str(out), "MUJOCO_GL": "egl"}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh")], cwd=SCRIPTS.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(out / "ai_pm_a.pt", weights_only=True)
    b = torch.load(out / "ai_pm_b.pt", weights_only=True)
    assert a["train"]["updates"] == 6 and b["train"]["updates"] == 12
    assert [x["optimizer"]["param_groups"][0]["lr"] for x in (a, b)] == [1e-3, 1e-4]
    env.update(QUICK="0", OUT=str(tmp_path / "none"))
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh")], cwd=SCRIPTS.parent, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "needs AI_PM_DATA" in proc.stdout


def test_bench_active_inference_free_energy_plot_shows_a_negative_curve():
    """The free energy of a small-obs_std Gaussian likelihood is negative after the first updates: its plot is linear
    (a log axis drew nothing, as on the page until 2026-12-04), limited to the values after the first 2% of updates
    so the first huge ones do not flatten the rest; a positive curve keeps the log axis."""
    import numpy as np

    bench = _load("bench_active_inference")
    curve = np.concatenate([[7e4, 3e4], np.linspace(-14000.0, -16500.0, 198)])
    scale, (low, high) = bench.free_energy_axis(curve)
    assert scale == "linear"
    assert low < -16500.0 < -14000.0 < high < 0.0
    assert bench.free_energy_axis(np.array([9e4, 5e3, 40.0])) == ("log", None)


def test_gpu_device_script_runs_a_command_with_the_packed_site_and_returns_one_file(tmp_path):
    """``scripts/gpu_device.sh`` (what a lent GPU runs): the packed site is importable, other packed folders are
    unpacked under $CARRY, ``python`` is the machine's python3, and everything the command wrote under $OUT comes
    back as the single device_out.tgz (the device tool returns at most 8 files); the command's exit status is
    the script's."""
    import os
    import subprocess
    import tarfile

    packed, site, data, out = (tmp_path / n for n in ("packed", "site", "data", "out"))
    for folder in (packed, site, data):
        folder.mkdir()
    (site / "carried_mod.py").write_text("X = 'from the site'\n")
    (data / "frames.txt").write_text("frames\n")
    for name, folder in (("site", site), ("ai_data", data)):
        with tarfile.open(packed / f"{name}.tar.xz", "w:xz") as tar:
            tar.add(folder, arcname=".")
    command = ("python -c \"import carried_mod, os; open(os.environ['OUT'] + '/a.txt', 'w').write(carried_mod.X)\" "
               "&& mkdir -p $OUT/sub && cp $CARRY/ai_data/frames.txt $OUT/sub/")
    env = {**os.environ, "PACKED": str(packed), "OUT": str(out)}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_device.sh"), command], cwd=SCRIPTS.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["device_out.tgz"]
    with tarfile.open(out / "device_out.tgz") as tar:
        assert tar.extractfile("./a.txt").read() == b"from the site"
        assert tar.extractfile("./sub/frames.txt").read() == b"frames\n"
    # a command that fails after writing part of its results: the status is its own, the part still comes back
    failed = subprocess.run(["bash", str(SCRIPTS / "gpu_device.sh"), "echo part > $OUT/part.txt; exit 3"],
                            cwd=SCRIPTS.parent, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 3
    with tarfile.open(out / "device_out.tgz") as tar:
        assert tar.extractfile("./part.txt").read() == b"part\n"


def test_bench_active_inference_checks_draw_the_same_cases_whatever_ran_before(tmp_path):
    """Checks 1 and 2 score a model on held-out cases drawn from seeds of their own: the same cases (so the same
    figures) whatever the global generator's state after training."""
    import torch

    bench = _load("bench_active_inference")
    args = bench.parse_args(["--quick", "--fig-dir", str(tmp_path)])
    heldout = bench.collect(args, 2, seed=5)
    agent = bench.build_agent(args).eval()
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            results = (bench.one_step_mse(agent, heldout, args), bench.scorer_ranking(agent, heldout, args),
                       bench.scorer_ranking(agent, heldout, args, horizon=2))
        # every figure but the wall times (the "<risk>_seconds" of each extra risk form; 0.1 vs 0.2 s on a busy
        # machine failed CI once)
        runs.append([{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in results])
    assert runs[0] == runs[1]


def test_bench_active_inference_change_form_of_check_1_credits_the_transition_only(tmp_path):
    """Check 1's second form, o_t + decode(s') - decode(s): with a model whose decoder draws every frame with the
    same error, whose transition knows each held-out case's true change (and only under its true action), the
    change form is exact while the plain decode keeps the decoder's error; under the zero action it is the copy,
    under another case's action worse than the copy."""
    import types

    import torch

    bench = _load("bench_active_inference")
    args = bench.parse_args(["--quick", "--fig-dir", str(tmp_path)])
    heldout = bench.collect(args, 2, seed=5)
    agent = bench.build_agent(args).eval()
    real = agent.world_model
    with bench.fixed_draws(args.seed + 10):
        batch = heldout.sample(args.mse_cases, frame_stack=agent.frame_stack, keys=["pixels"])
    cases = list(zip(batch["action"].float(), batch["pixels"], batch["next", "pixels"], strict=True))
    moves = {tuple(a.tolist()): real.target(nxt) - real.target(now) for a, now, nxt in cases}
    # an action names its case (a case drawn twice is the same case)
    assert all(torch.equal(moves[tuple(a.tolist())], real.target(nxt) - real.target(now)) for a, now, nxt in cases)
    bias = 0.3 * torch.rand(real.target(batch["pixels"]).shape[1:], generator=torch.Generator().manual_seed(1))

    def transition_members(s, action):  # the case's true change under its own action, no change otherwise
        change = torch.stack([moves.get(tuple(a.tolist()), torch.zeros_like(bias)) for a in action])
        return (s + change)[None], None

    fake = types.SimpleNamespace(posterior=lambda x: (real.target(x) + bias, None), decode_mean=lambda s: s,
                                 transition_members=transition_members, target=real.target)
    c1 = bench.one_step_mse(types.SimpleNamespace(world_model=fake, frame_stack=agent.frame_stack), heldout, args)
    assert c1["change_mse"] < 1e-10 < c1["copy_frame_mse"]
    assert c1["model_mse"] > c1["copy_frame_mse"] and not c1["pass"]  # the decoder's error stays in the plain form
    assert abs(c1["change_zero_action_mse"] - c1["copy_frame_mse"]) < 1e-9
    assert c1["change_other_action_mse"] > c1["copy_frame_mse"] and c1["change_pass"]
    # paired with the copy on the same cases: the mean difference is the difference of the means
    for name in ("model", "change"):
        assert c1[f"{name}_minus_copy_mean"] == pytest.approx(c1[f"{name}_mse"] - c1["copy_frame_mse"], abs=1e-7)
    assert c1["model_minus_copy_below_fraction"] < 0.5 < c1["change_minus_copy_below_fraction"]


def test_bench_active_inference_paired_difference():
    """Check 1's paired comparison with the copy: mean of a - b, its standard error (sample std / sqrt N) and the
    share of cases where a is lower."""
    import torch

    bench = _load("bench_active_inference")
    d = bench.paired_difference(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 0.0, 5.0, 0.0]))
    # differences 1, 2, -2, 4: mean 1.25, sample std 2.5, se 1.25
    assert d == pytest.approx({"mean": 1.25, "se": 1.25, "below_fraction": 0.25})


def test_bench_stamo_quick_runs_every_check_and_judges_on_the_better_readout(tmp_path):
    """``bench_stamo.py all --quick`` collects, trains and evaluates end to end in seconds; checks 6 and 7 are read
    out by both state probes and judged on the one with the higher held-out R^2; eval run again gives the same
    figures."""
    import json

    bench = _load("bench_stamo")
    bench.main(["all", "--quick", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "bench_stamo" / "results.json").read_text())
    for key in ("reconstruction", "state_probe", "latent_action_probe", "interpolation", "motion_transfer",
                "cotraining", "goal_reaching"):
        assert key in results, key
    r2 = results["readouts"]["r2_mean"]
    assert set(r2) == {"linear", "mlp"} and r2["linear"] == pytest.approx(results["state_probe"]["r2_mean"])
    best = max(r2, key=r2.get)
    for check in ("interpolation", "motion_transfer"):
        assert results[check]["readout"] == best and set(results[check]["by_readout"]) == {"linear", "mlp"}
    assert "mlp readout" in (tmp_path / "bench_stamo.md").read_text()
    # every co-training condition's BC net acts toward the goals, and co-training is also read in closed loop
    assert set(bench.BC_POLICY_NAMES.values()) <= set(results["goal_reaching"])
    closed = results["cotraining"]["closed_loop"]
    assert set(closed["final_distance"]) == set(bench.BC_POLICY_NAMES)
    assert "in closed loop" in (tmp_path / "bench_stamo.md").read_text()
    # the same command gives the same figures (the goal heads' starting weights are seeded too)
    bench.main(["eval", "--quick", "--out-dir", str(tmp_path), "--report", str(tmp_path / "again.md")])
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert {k: v for k, v in again.items() if k != "eval_seconds"} == {
        k: v for k, v in results.items() if k != "eval_seconds"}


def test_bench_stamo_interpolation_scores_follow_the_true_move_across_the_wrap():
    """Check 6's score: a joint read along the alphas counts as interpolating when its change from alpha 0 rises
    with alpha in the direction of the true move, including a wrapping joint that crosses +-pi on the way; pairs
    whose true move is under 0.1 rad or over 2.5 rad are not cases."""
    import math

    import torch

    bench = _load("bench_stamo")
    reacher = bench.TASKS["reacher-easy"]
    alphas = torch.linspace(0, 1, 5)
    steps = torch.linspace(0, 0.4, 5)
    reading = torch.zeros(5, 3, 2)
    reading[:, 0, 0] = bench.wrap(torch.tensor(3.0) + steps)  # crosses +pi: 3.0, 3.1, -3.08, ...
    reading[:, 0, 1] = -steps  # moves against the true move
    reading[:, 1, 0] = -steps  # a true move the wrong way round: a negative move read as one
    reading[:, 2] = torch.stack([steps, steps], 1)  # its true moves are not cases
    true_move = torch.tensor([[0.4, 0.4], [-0.4, 0.05], [3.0, 0.01]])
    out = bench.interpolation_scores(reading, alphas, true_move, reacher)
    assert out["cases"] == 3
    assert out["share_rho_above_0.9"] == pytest.approx(2 / 3)
    assert out["spearman_mean"] == pytest.approx((1 - 1 + 1) / 3)
    assert math.isclose(float(reading[2, 0, 0]), bench.wrap(torch.tensor(3.2)).item(), abs_tol=1e-6)
    assert bench.interpolation_scores(reading, alphas, torch.zeros(3, 2), reacher)["cases"] == 0


def test_bench_stamo_studies_open_a_finished_run(tmp_path):
    """``open_run`` (what the studies in docs/bench_stamo/ start from) reads a finished run's data split and
    model with the bench's own defaults, and refuses a flag the bench does not have; the noise-pairing,
    transfer-by-distance, co-training-seeds, labeller and probe-along-training studies run on a quick run and write
    their records; the labeller study's ``chunk_k`` is co-training's own labeller (the same MSE)."""
    import json
    import math
    import os
    import subprocess
    import sys

    bench = _load("bench_stamo")
    bench.main(["data", "--quick", "--out-dir", str(tmp_path)])
    bench.main(["train", "--quick", "--out-dir", str(tmp_path)])
    args, data, train_eps, test_eps, agent = bench.open_run(str(tmp_path), probe_updates=20)
    assert args.task == bench.DEFAULT_TASK and args.probe_updates == 20 and agent.trained_updates == 20
    assert args.preset == "smoke"  # the checkpoint's (--quick trains the smoke preset), not eval's default
    assert len(train_eps) + len(test_eps) == data["pixels"].shape[0] and not set(train_eps.tolist()) & set(
        test_eps.tolist())
    with pytest.raises(TypeError, match="no flag"):
        bench.open_run(str(tmp_path), probe_update=20)
    env = {**os.environ, "MUJOCO_GL": "egl"}
    studies = STUDIES / "bench_stamo"
    for script, flags in (("noise_pairing.py", ["--cases", "2", "--probe-updates", "20", "--sample-steps", "2"]),
                          ("transfer_by_distance.py", ["--cases", "8", "--probe-updates", "20", "--sample-steps", "2"]),
                          ("cotraining_seeds.py", ["--seeds", "0", "--probe-updates", "5", "--bc-updates", "5",
                                                   "--goals", "2"]),
                          ("labeller_variants.py", ["--probe-updates", "5"]),
                          ("probe_along_training.py", ["--checkpoints", str(tmp_path / "stamo_wm.pt")]),
                          ("interpolation_vs_real.py", ["--cases", "4", "--draws", "2", "--probe-updates", "20",
                                                       "--sample-steps", "2"])):
        out = tmp_path / script.replace(".py", ".json")
        proc = subprocess.run([sys.executable, str(studies / script), "--out-dir", str(tmp_path), "--json", str(out),
                               *flags], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        record = json.loads(out.read_text())
        assert record["out_dir"] == str(tmp_path)
        if script == "cotraining_seeds.py":
            closed = record["runs"]["0"]["closed_loop"]
            assert set(closed["final_distance"]) == {"1 part labelled", "1 part + 4 parts StaMo pseudo-labelled",
                                                     "5 parts labelled",
                                                     "1 part + 4 parts StaMo latent actions (second head)"}
            assert "random" in closed and record["goals"] == 2
            # one seed: the seeds' summary is that seed's reading
            assert record["closed_loop_mean_final_distance"] == closed["final_distance"]
            assert math.isclose(record["closed_loop_pseudo_minus_one_part_mean"],
                                closed["pseudo_minus_one_part"]["mean_difference"], rel_tol=1e-9)
            if closed["gap_recovered"] is not None:
                assert math.isclose(record["closed_loop_gap_recovered_of_means"], closed["gap_recovered"],
                                    rel_tol=1e-6)
            cotraining = record["runs"]["0"]
        if script == "labeller_variants.py":  # its chunk_k labeller is co-training's, fitted alike: same labels
            assert set(record["labellers"]) == {"chunk_k", "step", "prev+step", "prev+step+next", "prev+step+chunk_k",
                                                "state+chunk_k", "windows", "chunk_k ridge", "pca_cv"}
            assert set(record["choice"]["pca_cv"]) == {"components", "offsets"}
            assert math.isclose(record["labellers"]["chunk_k"], cotraining["pseudo_label_mse"], rel_tol=1e-6)
            assert math.isclose(record["mean_action_mse"], cotraining["pseudo_label_mean_action_mse"], rel_tol=1e-6)
        if script == "interpolation_vs_real.py":
            vs_real = record
            assert record["figure"] is None or Path(record["figure"]).exists()  # None: no ordered case failed
        if script == "probe_along_training.py":
            assert set(record["rows"][0]) >= {"updates", "r2_mean"} and record["rows"][0]["updates"] == 20
    for reading in vs_real["readouts"].values():  # every reading counts the same moving (case, joint)s
        assert reading["decoded_one_draw"]["cases"] == reading["decoded_mean_of_2_draws"]["cases"] \
            == vs_real["joint_cases"]
        assert reading["real_frames_on_monotone"]["cases"] \
            == reading["decoded_one_draw_on_monotone"]["cases"]


def test_interpolation_vs_real_scores_a_path_as_check_6_does():
    """``interpolation_vs_real.case_rhos`` reads a 5-row path as check 6 reads an interpolation: rho between the
    step and each moving joint's change from row 0, wrapped where the joint wraps and signed by the true move;
    joints that move 0.1 rad or less are not counted; one swapped pair of steps gives rho 0.9, which fails > 0.9,
    and its step back is the swap's size. ``shares`` counts the kept (case, joint)s per move bin and tolerance."""
    import numpy as np
    import torch

    study = _load("interpolation_vs_real", STUDIES / "bench_stamo")
    task = study.bs.TASKS["reacher-easy"]  # both joints wrap
    path = torch.tensor([
        # case 0: q1 rises 0.4 in order; q2 crosses pi (3.0 -> -2.9 is +0.38 rad, in order once wrapped)
        [[0.0, 3.0], [0.1, 3.1], [0.2, -3.1], [0.3, -3.0], [0.4, -2.9]],
        # case 1: q1 falls 0.4 in order (a negative move); q2 moves 0.05: not a moving joint
        [[1.0, 0.0], [0.9, 0.01], [0.8, 0.02], [0.7, 0.03], [0.6, 0.05]],
        # case 2: q1 rises 0.8 with steps 1 and 2 swapped; q2 rises 1.2 in order
        [[0.0, 0.0], [0.4, 0.3], [0.2, 0.6], [0.6, 0.9], [0.8, 1.2]],
    ]).transpose(0, 1)  # [5, 3 cases, 2 joints]
    true_move = task.difference(path[-1], path[0])
    rhos, moves, back, _ = study.case_rhos(path, true_move, task)
    np.testing.assert_allclose(rhos, [1.0, 1.0, 1.0, 0.9, 1.0], atol=1e-9)
    np.testing.assert_allclose(moves, [0.4, 2 * np.pi - 5.9, 0.4, 0.8, 1.2], atol=1e-5)
    np.testing.assert_allclose(back, [0.0, 0.0, 0.0, 0.2, 0.0], atol=1e-6)
    out = study.shares(rhos, moves, back)
    assert out["cases"] == 5 and out["share_rho_above_0.9"] == 0.8
    assert out["share_in_order_within_0.02_rad"] == 0.8 and out["share_in_order_within_0.05_rad"] == 0.8
    assert out["failing_median_step_back_rad"] == pytest.approx(0.2, abs=1e-6)
    back[3] = 0.03  # a step back of 0.03 rad is in order within 0.05 rad, not within 0.02
    out = study.shares(rhos, moves, back)
    assert out["share_in_order_within_0.02_rad"] == 0.8 and out["share_in_order_within_0.05_rad"] == 1.0
    assert {b: v["cases"] for b, v in out["by_move"].items()} == {"0.1-0.25": 0, "0.25-0.5": 3, "0.5-1.0": 1,
                                                                   "1.0-2.5": 1}
    assert out["by_move"]["0.5-1.0"]["share"] == 0.0 and out["by_move"]["0.1-0.25"]["share"] is None
    kept = study.shares(rhos, moves, back, rhos > 0.95)
    assert kept["cases"] == 4 and kept["share_rho_above_0.9"] == 1.0
    assert kept["share_in_order_within_0.02_rad"] == 1.0 and kept["failing_median_step_back_rad"] is None
    # the largest forward step's share: 0.25 for even steps, 1 for one jump, 0.4 for the swapped row; nan if still
    shares_ = study.largest_step_share(np.array([[0, 1, 2, 3, 4], [0, 0, 0, 0.5, 0.5], [0, 0.4, 0.2, 0.6, 0.8],
                                                 [0, -0.1, -0.2, -0.3, -0.4]], dtype=float))
    np.testing.assert_allclose(shares_[:3], [0.25, 1.0, 0.4])
    assert np.isnan(shares_[3])


def test_bench_stamo_cotraining_seeds_label_the_video_once_for_every_seed(tmp_path, monkeypatch):
    """``cotraining_seeds.py`` computes the pseudo-labels once (they do not depend on the BC seed; pca_cv's take
    minutes) and hands the same labels to every seed's ``cotraining``; ``cotraining`` refuses labels that are not one
    per training pair."""
    import argparse
    import json

    import torch

    bench = _load("bench_stamo")
    study = _load("cotraining_seeds", STUDIES / "bench_stamo")
    assert study.bs is bench
    real_cotraining = bench.cotraining
    agent = argparse.Namespace(config=argparse.Namespace(cotrain_offset=2, bc_lr=1e-3, bc_goal_input="difference"),
                               world_model=None, trained_updates=7)
    data = {"pixels": torch.zeros(3, 5, 1), "action": torch.zeros(3, 5, 1)}
    ns = argparse.Namespace(task=bench.DEFAULT_TASK)
    labellings, given = [], []

    def labels(flat, act, train_eps, k, args):
        labellings.append(k)
        return torch.full((4, 1), float(len(labellings))), {"chosen": len(labellings)}

    def cotraining(*args, seed, labels):
        given.append(labels)
        return {"gap_recovered": 0.1 * seed, "gap_recovered_latent_actions": 0.0}

    monkeypatch.setattr(bench, "open_run", lambda out_dir, **flags: (ns, data, torch.tensor([0, 1]),
                                                                       torch.tensor([2]), agent))
    monkeypatch.setattr(bench, "encode_all", lambda wm, px: torch.zeros(3, 5, 2, 1))
    monkeypatch.setattr(bench, "cotraining_labels", labels)
    monkeypatch.setattr(bench, "cotraining", cotraining)
    monkeypatch.setattr(sys, "argv", ["cotraining_seeds.py", "--out-dir", str(tmp_path), "--seeds", "0", "1", "2",
                                      "--json", str(tmp_path / "seeds.json")])
    study.main()
    assert labellings == [2] and len(given) == 3 and all(g is given[0] for g in given)
    assert json.loads((tmp_path / "seeds.json").read_text())["gap_recovered_mean"] == pytest.approx(0.1)
    run_args = argparse.Namespace(task=bench.DEFAULT_TASK)
    agent.config.bc_channels = 4
    with pytest.raises(ValueError, match="3 labels given for"):
        real_cotraining(agent, torch.zeros(3, 9, 3, 8, 8), torch.zeros(3, 9, 2), torch.zeros(3, 9, 4),
                         torch.tensor([0, 1]), torch.tensor([2]), run_args, labels=(torch.zeros(3, 2), {}))


def test_bench_stamo_rescaled_pseudo_labels_take_the_labelled_actions_spread_about_their_own_mean():
    """``rescale_to_spread`` (co-training's ``--rescale-pseudo-labels``): over the chosen rows, each column's
    standard deviation becomes the reference's and its mean stays; every row is moved by the same map; the result
    is clipped to [-1, 1]."""
    import torch

    bench = _load("bench_stamo")
    g = torch.Generator().manual_seed(0)
    labels = 0.1 * torch.randn(200, 2, generator=g) + torch.tensor([0.05, -0.02])
    rows = torch.arange(200) >= 50
    reference = torch.rand(300, 2, generator=g) * torch.tensor([0.6, 0.3]) - torch.tensor([0.3, 0.15])
    out = bench.rescale_to_spread(labels, rows, reference)
    assert torch.allclose(out[rows].std(0), reference.std(0), atol=1e-5)
    assert torch.allclose(out[rows].mean(0), labels[rows].mean(0), atol=1e-6)
    centre, spread = labels[rows].mean(0), reference.std(0) / labels[rows].std(0)
    assert torch.allclose(out[~rows], (labels[~rows] - centre) * spread + centre, atol=1e-6)
    wide = bench.rescale_to_spread(labels, rows, 20 * reference)
    assert wide.abs().max() <= 1 and (wide.abs() == 1).any()


def test_bench_stamo_windows_labeller_averages_each_steps_k_windows(monkeypatch):
    """``pseudo_labels``: ``windows`` fits its probe on the labelled rows' [E(o_t), E(o_{t+k}) - E(o_t)] against
    their action chunks, and a row's label is the mean, over the windows starting at t - j (j < k, t - j >= 0), of
    element j of that window's predicted chunk; ``chunk`` reads element 0 of the window at t from E(o_{t+k}) -
    E(o_t) alone. The probe is faked: it reads the window's start off the tokens (E(o_t) = (t^2, e)) and predicts
    element j as 0.01 * start + 0.001 * j, so each label says which windows and elements it was averaged from."""
    import torch

    bench = _load("bench_stamo")
    n_eps, n_frames, k = 3, 10, 3
    t_grid = torch.arange(n_frames, dtype=torch.float32)
    flat = torch.stack([t_grid.square().expand(n_eps, -1),
                        torch.arange(n_eps, dtype=torch.float32)[:, None].expand(-1, n_frames)], -1)
    act = torch.rand(n_eps, n_frames - 1, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sign = torch.tensor([1.0, -1.0])
    fitted = {}

    def fake_fit(x, y, updates, seed, hidden=256):
        fitted.update(x=x, y=y)

        def probe(z):  # windows: z = [E(o_s), E(o_{s+k}) - E(o_s)]; chunk: z = E(o_{s+k}) - E(o_s) = (2sk + k^2, 0)
            start = z[:, 0].sqrt() if z.shape[1] == 4 else (z[:, 0] - k * k) / (2 * k)
            chunk = 0.01 * start[:, None] + 0.001 * torch.arange(k)
            return (chunk[:, :, None] * sign).flatten(1)
        return probe

    monkeypatch.setattr(bench, "fit_mlp", fake_fit)
    labelled = bench.offset_pairs(n_frames - 1, k, torch.tensor([0]))
    e, t = bench.offset_pairs(n_frames - 1, k, torch.tensor([1, 2]))
    got = bench.pseudo_labels(flat, act, labelled, (e, t), k, "windows", probe_updates=7)
    e_lab, t_lab = labelled
    assert torch.equal(fitted["x"], torch.cat([flat[e_lab, t_lab], flat[e_lab, t_lab + k] - flat[e_lab, t_lab]], 1))
    assert torch.equal(fitted["y"], bench.action_chunks(act, e_lab, t_lab, k).flatten(1))
    for i, ti in enumerate(t.tolist()):
        js = [j for j in range(k) if ti - j >= 0]
        want = sum(0.01 * (ti - j) + 0.001 * j for j in js) / len(js)
        assert torch.allclose(got[i], want * sign, atol=1e-6), (ti, got[i], want)
    chunk = bench.pseudo_labels(flat, act, labelled, (e, t), k, "chunk")
    assert torch.equal(fitted["x"], flat[e_lab, t_lab + k] - flat[e_lab, t_lab])
    assert torch.allclose(chunk, 0.01 * t[:, None].float() * sign, atol=1e-6)
    with pytest.raises(ValueError, match="labeller"):
        bench.pseudo_labels(flat, act, labelled, (e, t), k, "window")


def test_bench_stamo_window_labels_keep_each_window_inside_the_episode(monkeypatch):
    """``window_labels`` with an offset longer than the rows' own: a row's windows start at t - j (j < k') and must
    end by the episode's last frame, so late rows average fewer windows. The probe is faked as in the windows test
    (element j of the window starting at s predicts 0.01 s + 0.001 j)."""
    import torch

    bench = _load("bench_stamo")
    n_frames, k2 = 10, 5
    t_grid = torch.arange(n_frames, dtype=torch.float32)
    features = torch.stack([t_grid.square(), torch.zeros(n_frames)], -1)[None]
    act = torch.zeros(1, n_frames - 1, 1)
    monkeypatch.setattr(bench, "fit_mlp", lambda x, y, updates, seed, hidden=256: (
        lambda z: (0.01 * z[:, 0].sqrt()[:, None] + 0.001 * torch.arange(k2))))
    e, t = bench.offset_pairs(n_frames - 1, 2, torch.tensor([0]))
    got = bench.window_labels(features, act, bench.offset_pairs(n_frames - 1, k2, torch.tensor([0])), (e, t), k2, 3)
    for i, ti in enumerate(t.tolist()):
        js = [j for j in range(k2) if ti - j >= 0 and ti - j + k2 <= n_frames - 1]
        want = sum(0.01 * (ti - j) + 0.001 * j for j in js) / len(js)
        assert abs(float(got[i, 0]) - want) < 1e-6, (ti, float(got[i, 0]), want)


def test_bench_stamo_token_pca_is_fitted_on_the_given_episodes_only():
    """``token_pca``: each frame's coordinates on the top principal axes of the standardised tokens of the given
    episodes' frames (the training frames, video included); another episode's tokens change nothing."""
    import torch

    bench = _load("bench_stamo")
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(3, 20, 6, generator=g) @ torch.randn(6, 6, generator=g) + torch.arange(6.0)
    got = bench.token_pca(flat, torch.tensor([0, 2]), 3)
    frames = flat[[0, 2]].flatten(0, 1).double()
    z = (frames - frames.mean(0)) / frames.std(0)
    axes = torch.linalg.svd(z, full_matrices=False).Vh[:3].T
    want = ((flat.double() - frames.mean(0)) / frames.std(0)) @ axes
    sign = (got.double() * want).sum((0, 1)).sign()  # an axis' sign is arbitrary
    assert torch.allclose(got.double(), want * sign, atol=1e-4)
    other = flat.clone()
    other[1] *= 100.0
    assert torch.allclose(bench.token_pca(other, torch.tensor([0, 2]), 3)[[0, 2]], got[[0, 2]], atol=1e-5)


def test_bench_stamo_pca_cv_labeller_chooses_by_the_labelled_episodes_alone(monkeypatch):
    """``pca_cv``: 2-fold cross-validation over the labelled episodes (fit on one half's k'-pairs, score the other
    half's rows), the candidate of lowest MSE chosen, then every chosen offset refitted on all labelled episodes and
    the labels averaged. ``window_labels`` is faked: its label is the true action plus a bias set by the number of
    components and the offset, so that only 16 components with offsets (1, 2) cancel; the fake records each fit."""
    import torch

    bench = _load("bench_stamo")
    n_eps, n_frames, k = 6, 12, 4
    flat = torch.randn(n_eps, n_frames, 40, generator=torch.Generator().manual_seed(1))
    act = torch.rand(n_eps, n_frames - 1, 2, generator=torch.Generator().manual_seed(2)) - 0.5
    bias = {1: 0.2, 2: -0.2, 4: 0.3}
    calls = []

    def fake_window_labels(features, act_, fit_rows, rows, k2, probe_updates):
        m = features.shape[-1]
        calls.append((m, k2, set(fit_rows[0].tolist()), set(rows[0].tolist())))
        return act_[rows] + bias[k2] * (1.0 if m == 16 else 2.0)

    monkeypatch.setattr(bench, "window_labels", fake_window_labels)
    labelled_eps, video_eps = torch.tensor([3, 0, 4, 1]), torch.tensor([2, 5])
    labelled = bench.offset_pairs(n_frames - 1, k, labelled_eps)
    rows = bench.offset_pairs(n_frames - 1, k, torch.cat([labelled_eps, video_eps]))
    report = {}
    got = bench.pseudo_labels(flat, act, labelled, rows, k, "pca_cv", probe_updates=5, report=report)
    assert report["chosen"] == {"components": 16, "offsets": [1, 2]}
    assert min(report["cv_mse"].values()) == report["cv_mse"]["16 components, k' 1 2"] < 1e-12
    assert len(report["cv_mse"]) == len(bench.PCA_CV_DIMS) * 7
    assert torch.allclose(got, act[rows].clamp(-1, 1), atol=1e-6)
    cv_calls, final_calls = calls[:-2], calls[-2:]
    halves = [{3, 0}, {4, 1}]
    for m, k2, fit_eps, val_eps in cv_calls:
        assert fit_eps in halves and val_eps in halves and fit_eps != val_eps, (m, k2, fit_eps, val_eps)
    assert len(cv_calls) == len(bench.PCA_CV_DIMS) * 2 * len(bench.PCA_CV_OFFSETS)
    assert [(m, k2) for m, k2, _, _ in final_calls] == [(16, 1), (16, 2)]
    for _, _, fit_eps, label_eps in final_calls:
        assert fit_eps == {3, 0, 4, 1} and label_eps == {3, 0, 4, 1, 2, 5}
    with pytest.raises(ValueError, match="2 or more"):
        bench.pseudo_labels(flat, act, bench.offset_pairs(n_frames - 1, k, torch.tensor([0])), rows, k, "pca_cv")


def test_bench_stamo_labeller_study_reads_the_token_differences_around_t():
    """The labeller study's inputs at rows (e, t): E(o_t) - E(o_{t-1}) (zero at t = 0), E(o_{t+1}) - E(o_t),
    E(o_{t+2}) - E(o_{t+1}), E(o_{t+k}) - E(o_t) and E(o_t), each of its own episode; no step after with k = 1."""
    import torch

    _load("bench_stamo")
    study = _load("labeller_variants", STUDIES / "bench_stamo")
    flat = (torch.arange(2 * 8, dtype=torch.float32) ** 2).reshape(2, 8, 1) * torch.tensor([1.0, -2.0])
    e, t = torch.tensor([0, 1, 1]), torch.tensor([0, 2, 4])
    got = study.latent_steps(flat, e, t, 3)
    for i, (ei, ti) in enumerate(zip(e.tolist(), t.tolist(), strict=True)):
        prev = flat[ei, ti] - flat[ei, ti - 1] if ti > 0 else torch.zeros(2)
        assert torch.equal(got["prev"][i], prev)
        assert torch.equal(got["step"][i], flat[ei, ti + 1] - flat[ei, ti])
        assert torch.equal(got["next"][i], flat[ei, ti + 2] - flat[ei, ti + 1])
        assert torch.equal(got["chunk"][i], flat[ei, ti + 3] - flat[ei, ti])
        assert torch.equal(got["state"][i], flat[ei, ti])
    assert "next" not in study.latent_steps(flat, e, t, 1)


def test_bench_stamo_latent_action_cotraining_regresses_actions_on_labelled_rows_and_latents_on_video_rows():
    """Co-training in the paper's form (``latent_action_bc``) against a transcription: the action head's MSE
    against a_t over the batch's labelled rows, plus the second head's MSE against the standardised latent action
    E(o_{t+k}) - E(o_t) over its video rows; a batch of one kind gives that term alone."""
    import torch

    bench = _load("bench_stamo")
    from latentrl.agents.stamo import StaMoAgent

    cfg = StaMoAgent.make_config("smoke")
    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 256, (3, 10, 3, 64, 64), dtype=torch.uint8, generator=g)
    tokens = torch.randn(3, 10, 8, generator=g)
    k = 2
    e, t = bench.offset_pairs(9, k, torch.arange(3))
    is_lab, y = e == 0, torch.rand(len(e), 2, generator=g) * 2 - 1
    make_net, loss_fn = bench.latent_action_bc(px, e, t, is_lab, y, tokens, k, cfg)
    torch.manual_seed(0)
    net = make_net()
    m = tokens[e, t + k] - tokens[e, t]
    m = (m - m.mean(0)) / m.std(0)
    for idx in (torch.arange(len(e)), torch.nonzero(is_lab).flatten(), torch.nonzero(~is_lab).flatten()):
        h = net.trunk(net.inputs(px[e[idx], t[idx]], px[e[idx], t[idx] + k]))
        lab = is_lab[idx]
        per_row = (((net.head(h) - y[idx]).square().mean(1), lab),
                   ((net.latent_head(h) - m[idx]).square().mean(1), ~lab))
        expected = sum(err[rows].mean() for err, rows in per_row if rows.any())
        torch.testing.assert_close(loss_fn(net, idx), expected)
    assert net.latent_head[-1].out_features == tokens.shape[-1]


def test_bench_stamo_closed_loop_cotraining_reads_the_final_distances_of_the_bc_conditions():
    """Table 5 judges co-training by what the policies do: ``closed_loop_cotraining`` takes the co-training
    conditions' BC nets' final distances to the same goals from ``goal_reaching`` and gives the share of the 1-part
    -> 5-part improvement that the pseudo-labels (and the latent-action head) recover, with the paired difference
    pseudo - 1 part and its standard error. Missing a condition it reads nothing."""
    import math

    bench = _load("bench_stamo")
    names = bench.BC_POLICY_NAMES
    finals = {"1 part labelled": [2.0, 2.4, 1.6, 2.0], bench.PSEUDO_CONDITION: [1.0, 1.8, 1.4, 1.8],
              "5 parts labelled": [1.0, 1.2, 1.0, 0.8], bench.LATENT_CONDITION: [1.8, 2.2, 1.6, 2.0]}
    gr = {names[c]: {"final_distances": d, "final_distance": sum(d) / 4, "min_distances": [0.0] * 4}
          for c, d in finals.items()}
    gr["random"] = {"final_distances": [3.0] * 4, "final_distance": 3.0}
    cl = bench.closed_loop_cotraining(gr)
    one, pseudo, five, latent = (sum(d) / 4 for d in finals.values())  # 2.0, 1.5, 1.0, 1.9
    assert cl["gap_recovered"] == pytest.approx((one - pseudo) / (one - five)) == pytest.approx(0.5)
    assert cl["gap_recovered_latent_actions"] == pytest.approx((one - latent) / (one - five))
    diff = [a - b for a, b in zip(finals[bench.PSEUDO_CONDITION], finals["1 part labelled"], strict=True)]
    mean = sum(diff) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / 3) / 2
    assert cl["pseudo_minus_one_part"]["mean_difference"] == pytest.approx(mean)
    assert cl["pseudo_minus_one_part"]["se"] == pytest.approx(se)
    assert cl["final_distance"]["5 parts labelled"] == pytest.approx(five) and cl["goals"] == 4
    del gr[names["5 parts labelled"]]
    assert bench.closed_loop_cotraining(gr) is None


def test_bench_stamo_interpolation_and_transfer_decode_from_one_noise_per_case():
    """Checks 6 and 7 compare decoded frames of one case with each other (along the alphas; before and after
    adding dz): each case's frames start from one sampler noise, so with no change in the tokens the frames are
    the same, and what differs between them is the tokens' doing. (Independent draws, as before 2026-12-05, give
    different frames for the same tokens: the decoded 'change' of a transfer was partly the sampler's.)"""
    import torch

    bench = _load("bench_stamo")
    from latentrl.agents.stamo import StaMoAgent

    torch.manual_seed(0)
    wm = StaMoAgent(StaMoAgent.make_config("smoke"), (3, 64, 64), 2).world_model.eval()
    with torch.no_grad():  # the decoder starts as a constant (zero-initialised AdaLN gates and output layer)
        for param in wm.parameters():
            param.add_(0.05 * torch.randn_like(param))
    z = torch.randn(3, wm.num_tokens, wm.token_dim)

    def same(a, b):  # up to the last bits: a batched decode's rows may take different GEMM paths (AVX512 VMs do)
        return (a - b).abs().max() < 1e-3

    base, moved = bench.transfer_frames(wm, z, torch.zeros_like(z), steps=3)
    assert same(base, moved)
    assert not same(base[0], base[1])  # the cases themselves draw different noise
    moved_by = bench.transfer_frames(wm, z, 0.5 * torch.ones_like(z), steps=3)[1]
    assert not same(moved_by, base)
    alphas = torch.linspace(0, 1, 5)
    frames = bench.interpolation_frames(wm, z, z, alphas, steps=3).reshape(len(alphas), 3, 3, 64, 64)
    assert all(same(frames[a], frames[0]) for a in range(1, len(alphas)))
    ends = bench.interpolation_frames(wm, z, z + 1.0, alphas, steps=3).reshape(len(alphas), 3, 3, 64, 64)
    assert same(ends[0], frames[0]) and not same(ends[-1], frames[0])
    with pytest.raises(ValueError, match="do not split into 2 blocks"):
        bench.decode(wm, z, steps=3, blocks=2)


def test_bench_stamo_trains_the_goal_policies_it_runs():
    """``bench_stamo.py eval`` trains the agent's goal head and its goal probe before goal reaching (the
    autoencoder run trains neither; the probe policy once ran with its initial weights): on tokens that move
    by a fixed linear map of the action, both predict held-out actions better than the mean action. (A k-step
    difference holds the sum of k actions: the best k = 2 probe halves the mean action's error, the best head,
    over k in {1, 2}, quarters it.)"""
    import torch

    bench = _load("bench_stamo")
    from latentrl.agents.stamo import StaMoAgent

    agent = StaMoAgent(StaMoAgent.make_config("smoke"), (3, 64, 64), 2)
    agent.eval()
    g = torch.Generator().manual_seed(0)
    episodes, steps, dim = 10, 30, agent.latent_dim
    act = torch.rand(episodes, steps, 2, generator=g) * 2 - 1
    mix = torch.randn(2, dim, generator=g)
    start = torch.randn(episodes, 1, dim, generator=g)
    tokens = torch.cat([start, start + torch.cumsum(act @ mix, dim=1)], dim=1)  # [E, T + 1, 2D]
    eps = torch.arange(episodes)
    res = bench.fit_goal_heads(agent, tokens, act, eps[eps % 5 != 4], eps[eps % 5 == 4], updates=300, seed=0)
    for name, bound in (("probe", 0.6), ("goal_head", 0.4)):
        assert res[name]["heldout_mse"] < bound * res[name]["mean_action_mse"], (name, res[name])


@pytest.mark.parametrize("obs", ["state", "pixels"])
def test_bench_zero_shot_trains_from_the_observation_it_names(tmp_path, monkeypatch, obs):
    """``bench_zero_shot.py --obs pixels`` trains the agents from frames with an env that renders them (and
    keeps physics for relabelling); the default trains from states. The training command is read, not run."""
    bench = _load("bench_zero_shot")
    commands = []

    def record(cmd, **_):
        commands.append(cmd)
        raise RuntimeError("stop after the training command")

    monkeypatch.setattr(bench.subprocess, "run", record)
    job = {"agent": "td_jepa", "seed": 0, "run": str(tmp_path / "run"), "data": str(tmp_path / "data"),
           "domain": "walker", "obs": obs, "points": [10, 20], "samples": 10, "episodes": 1}
    with pytest.raises(RuntimeError, match="stop after"):
        bench.train_and_evaluate(job)
    (cmd,) = commands
    assert f"agent.obs_type={obs}" in cmd and "steps=20" in cmd
    env_obs = [c for c in cmd if c.startswith("env.obs=")]
    expected = "env.obs=[pixels,state,physics]" if obs == "pixels" else "env.obs=[state,physics]"
    assert env_obs == [expected]


def test_bench_zero_shot_refuses_a_workdir_made_with_other_settings(tmp_path, monkeypatch):
    """Runs and data are reused by folder name: a workdir holding a state run, a walker dataset of another size or
    one without frames is refused (with what differs) before anything is trained or overwritten."""
    bench = _load("bench_zero_shot")
    work = tmp_path / "bench"
    (work / "data").mkdir(parents=True)
    meta = {"domain": "walker", "num_transitions": 3000, "schema": {"obs": ["pixels", "state", "physics"]}}
    (work / "data" / "replay.json").write_text(json.dumps(meta))
    (work / "td_jepa-s0").mkdir()
    config = work / "td_jepa-s0" / "config.yaml"
    config.write_text(yaml.safe_dump({"agent": {"name": "td_jepa", "overrides": {"obs_type": "pixels"}}, "seed": 0,
                                      "data": str(work / "data")}))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))

    def main(*argv):
        monkeypatch.setattr(sys, "argv", ["bench_zero_shot.py", "--workdir", str(work), "--agents", "td_jepa",
                                          "--seeds", "0", "--updates", "20", "--eval-points", "1", *argv])
        bench.main()

    before = config.read_text()
    with pytest.raises(SystemExit, match=r"td_jepa-s0 was trained with obs pixels \(asked: state\)"):
        main("--obs", "state", "--dataset-steps", "3000")
    with pytest.raises(SystemExit, match=r"holds 3000 transitions, --dataset-steps asks 5000"):
        main("--obs", "pixels", "--dataset-steps", "5000")
    with pytest.raises(SystemExit, match="collected on walker, not --domain cheetah"):
        main("--obs", "pixels", "--dataset-steps", "3000", "--domain", "cheetah")
    assert config.read_text() == before
    # the settings it was made with pass the check
    args = SimpleNamespace(obs="pixels", domain="walker", dataset_steps=3000)
    job = {"agent": "td_jepa", "seed": 0, "run": str(work / "td_jepa-s0"), "data": str(work / "data"), "obs": "pixels"}
    assert bench.reuse_problems(work, [job], args) == []
    meta["schema"]["obs"] = ["state", "physics"]
    (work / "data" / "replay.json").write_text(json.dumps(meta))
    assert "needs ['physics', 'pixels']" in bench.reuse_problems(work, [job], args)[0]


def test_bench_zero_shot_first_look_is_the_readmes_few_minute_setting_and_flags_beside_it_win():
    """``--first-look`` (the README's first command): point_mass_maze, 10k RND steps, 2k updates, one checkpoint,
    one episode, seed 0, written under runs/first_look (never over the docs page); a flag beside it wins; without
    it the defaults are the benchmark's (walker, docs/bench_zero_shot.md)."""
    bench = _load("bench_zero_shot")
    args = bench.parse_args(["--first-look"])
    assert (args.domain, args.dataset_steps, args.updates, args.eval_points, args.episodes, args.seeds) == (
        "point_mass_maze", 10000, 2000, 1, 1, [0])
    assert (args.workdir, args.out) == ("runs/first_look", "runs/first_look/zero_shot.md")
    assert args.heldout_steps == 2000 and args.jobs == 2 and args.obs == "state"
    args = bench.parse_args(["--first-look", "--seeds", "3", "4", "--updates", "4000"])
    assert (args.seeds, args.updates, args.domain) == ([3, 4], 4000, "point_mass_maze")
    # argparse takes an abbreviation: it must not run the full walker benchmark over the docs page
    assert bench.parse_args(["--first"]).out == "runs/first_look/zero_shot.md"
    args = bench.parse_args([])
    assert (args.domain, args.updates, args.out) == ("walker", 20000, "docs/bench_zero_shot.md")
    readme = (SCRIPTS.parent / "README.md").read_text()
    assert "python scripts/bench_zero_shot.py --first-look" in readme.split("**Run the tests**")[0]


def test_bench_zero_shot_report_averages_tasks_per_seed_and_lists_each_seed(tmp_path):
    """The page's tables from a results.json: the domain average is the mean over tasks, per seed, then mean +- s.e.
    over seeds; the per-seed table lists every run's average at every checkpoint, under its own seed."""
    bench = _load("bench_zero_shot")
    tasks = ["walker-stand", "walker-spin"]

    def run(agent, seed, by_point):  # by_point: updates -> (stand, spin)
        scores = {str(u): dict(zip(tasks, v, strict=True)) for u, v in by_point.items()}
        return {"agent": agent, "seed": seed, "scores": scores, "train_seconds": 60.0,
                "reward_r2": {"20": {t: 0.5 for t in tasks}}}

    raw = {"random": {"walker-stand": [10.0, 20.0], "walker-spin": [30.0, 40.0]}, "points": [10, 20],
           "runs": [run("td_jepa", 3, {10: (100.0, 0.0), 20: (300.0, 100.0)}),
                    run("td_jepa", 4, {10: (50.0, 10.0), 20: (60.0, 20.0)}),
                    run("fb", 3, {10: (1.0, 3.0), 20: (5.0, 7.0)}),
                    run("fb", 4, {10: (2.0, 4.0), 20: (9.0, 11.0)})]}
    args = SimpleNamespace(agents=["td_jepa", "fb"], seeds=[3, 4], domain="walker", obs="state", jobs=2,
                           collect_updates_per_step=0.25, samples=10, episodes=1, out=str(tmp_path / "page.md"))
    bench.write_report(args, raw, 60.0, _Buffer())
    page = (tmp_path / "page.md").read_text()
    # td_jepa at 20 updates: seed 3 (300 + 100) / 2 = 200, seed 4 (60 + 20) / 2 = 40 -> 120 +- 80
    assert "| **walker average** | **25.0 +- 5.0** | **120.0 +- 80.0** | **8.0 +- 2.0** |" in page
    assert "| updates | td_jepa s3 | td_jepa s4 | fb s3 | fb s4 |" in page
    assert "| 10 | 50.0 | 30.0 | 2.0 | 3.0 |" in page
    assert "| 20 | 200.0 | 40.0 | 6.0 | 10.0 |" in page
    assert "random per seed: 20.0, 30.0" in page


def test_bench_zero_shot_loss_table_reads_each_agents_term_on_train_and_heldout(tmp_path):
    """The held-out loss table: each agent's own term (TD-JEPA phi_loss, FB fb_loss, not the total), train and
    held-out as mean +- s.e. over seeds, and the ratio as the mean of the seeds' ratios; the page carries it."""
    bench = _load("bench_zero_shot")

    def run(agent, seed, pairs):  # pairs: (train, held-out) at updates 10 and 20
        key = bench.MAIN_LOSS[agent]
        losses = {str(u): {"train": {key: t, "loss": 99.0}, "heldout": {key: h, "loss": 99.0}}
                  for u, (t, h) in zip([10, 20], pairs, strict=True)}
        return {"agent": agent, "seed": seed, "losses": losses}

    raw = {"points": [10, 20], "runs": [run("td_jepa", 0, [(1.0, 2.0), (2.0, 6.0)]),
                                        run("td_jepa", 1, [(3.0, 3.0), (2.0, 2.0)]),
                                        run("fb", 0, [(0.5, 1.0), (0.5, 1.0)])]}
    lines = bench.loss_table(SimpleNamespace(agents=["td_jepa", "fb"], heldout_steps=3000), raw)
    # td_jepa at 10: train (1, 3) -> 2 +- 1, held-out (2, 3) -> 2.5 +- 0.5, ratios (2, 1) -> 1.50
    assert "| 10 | 2 +- 1 | 2.5 +- 0.5 | 1.50 | 0.5 +- 0 | 1 +- 0 | 2.00 |" in lines
    assert "| 20 | 2 +- 0 | 4 +- 2 | 2.00 | 0.5 +- 0 | 1 +- 0 | 2.00 |" in lines
    assert any("3000 transitions" in line and "`phi_loss`" in line and "`fb_loss`" in line for line in lines)
    assert bench.loss_table(SimpleNamespace(agents=["td_jepa"]), {"points": [10], "runs": [{"agent": "td_jepa"}]}) == []


def test_bench_zero_shot_measures_losses_of_checkpoints_scored_before(tmp_path, monkeypatch):
    """A workdir scored before the held-out loss existed gets its losses measured on its kept checkpoints, without
    rolling the policies out again; a run with both on disk loads nothing; each checkpoint is measured on the
    training data and on the held-out data."""
    bench = _load("bench_zero_shot")
    run = tmp_path / "td_jepa-s0"
    (run / "checkpoints").mkdir(parents=True)
    for u in (10, 20):
        (run / "checkpoints" / f"{u:09d}.pt").write_text("")
    scores = {str(u): {"walker-stand": float(u)} for u in (10, 20)}
    (run / "zero_shot.json").write_text(json.dumps({"scores": scores, "train_seconds": 5.0}))
    loaded, measured = [], []
    monkeypatch.setattr(bench.ReplayBuffer, "load", staticmethod(lambda path: f"buffer:{Path(path).name}"))
    monkeypatch.setattr(bench, "load_agent", lambda path: (loaded.append(Path(path).name) or f"agent:{Path(path).stem}",
                                                           {"env": {}}))
    monkeypatch.setattr(bench, "evaluate_reward_tasks", lambda *a, **k: pytest.fail("rolled out again"))

    def losses(agent, data, *, batches, seed):
        measured.append((agent, data, batches, seed))
        return {"phi_loss": 1.0 if data == "buffer:data" else 2.0}

    monkeypatch.setattr(bench, "representation_losses", losses)
    job = {"agent": "td_jepa", "seed": 3, "run": str(run), "data": str(tmp_path / "data"), "domain": "walker",
           "obs": "state", "points": [10, 20], "samples": 10, "episodes": 1, "heldout": str(tmp_path / "heldout"),
           "loss_batches": 4}
    out = bench.train_and_evaluate(job)
    assert loaded == ["000000010.pt", "000000020.pt"]
    assert measured == [(f"agent:{u:09d}", data, 4, 3) for u in (10, 20) for data in ("buffer:data", "buffer:heldout")]
    assert out["losses"]["20"] == {"train": {"phi_loss": 1.0}, "heldout": {"phi_loss": 2.0}}
    assert out["scores"] == scores
    assert json.loads((run / "zero_shot.json").read_text())["losses"] == out["losses"]
    loaded.clear()
    bench.train_and_evaluate(job)
    assert loaded == []


class _Buffer:
    num_episodes = 2

    def __len__(self):
        return 2000


def test_bench_active_inference_refuses_data_collected_with_other_flags(tmp_path, monkeypatch):
    """``--data`` is reused when it holds buffers: ones of another domain, episode count or episode length are
    refused with what differs (nothing collected or written), the ones the flags describe are read back."""
    import torch

    bench = _load("bench_active_inference")
    data = tmp_path / "data"
    args = bench.parse_args(["--quick", "--data", str(data), "--task", "point_mass-easy"])
    train, heldout = bench.load_or_collect(args)  # 2 + 1 episodes x 12 steps, written to --data
    assert (train.num_episodes, len(train), heldout.num_episodes) == (2, 24, 1)
    monkeypatch.setattr(bench, "collect", lambda *a, **k: pytest.fail("collected again"))
    again, _ = bench.load_or_collect(args)
    assert torch.equal(torch.as_tensor(again.storage["pixels"]), torch.as_tensor(train.storage["pixels"]))
    before = sorted(p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file())
    for change, message in ((("task", "reacher-easy"), r"holds point_mass episodes, --task reacher-easy is reacher"),
                            (("episode_length", 10), r"train holds episodes of 12 steps, --episode-length is 10"),
                            (("train_episodes", 4), r"train holds 2 episodes, the flags ask 4")):
        bad = bench.parse_args(["--quick", "--data", str(data), "--task", "point_mass-easy"])
        setattr(bad, *change)
        with pytest.raises(SystemExit, match=message):
            bench.load_or_collect(bad)
    assert sorted(p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()) == before


def test_bench_stamo_motion_transfer_reports_moving_sources_beside_every_case():
    """Check 7's share of positive cosines counts every case (the judged figure); the share over sources that move
    0.1-2.5 rad leaves out the still ones, whose cosine is the readout's noise, and the ones beyond 2.5 rad."""
    import torch

    bench = _load("bench_stamo")
    source = torch.tensor([[0.5, 0.0], [0.0, -0.4], [0.01, 0.02], [0.02, -0.01], [3.0, 0.0]])
    decoded = torch.tensor([[0.3, 0.1], [0.1, -0.2], [-0.05, -0.05], [-0.01, 0.02], [1.0, 0.0]])
    out = bench.transfer_cosines(decoded, source)
    assert out["share_positive_cosine"] == pytest.approx(3 / 5)  # the two still sources decode the wrong way
    assert out["moving_cases"] == 2 and out["share_positive_cosine_moving"] == pytest.approx(1.0)
    assert bench.transfer_cosines(decoded[2:4], source[2:4])["share_positive_cosine_moving"] is None


def test_gpu_prepare_collects_and_packs_the_carry(tmp_path):
    """``scripts/gpu_prepare.sh`` (the next lease's carry from nothing) at tiny sizes: each part's data is collected
    and packed into a tarball that unpacks to what gpu_checks.sh reads (train/ and heldout/ buffers; StaMo's
    episodes.pt); run again, it packs the folders it finds instead of collecting; an unknown part is refused."""
    import os
    import subprocess
    import tarfile

    data, carry = tmp_path / "data", tmp_path / "carry"
    env = {**os.environ, "WHAT": "pm stamo", "DATA": str(data), "CARRY_DIR": str(carry), "EPISODES_SCALE": "125",
           "MUJOCO_GL": "egl"}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_prepare.sh")], cwd=SCRIPTS.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with tarfile.open(carry / "ai_pm.tar.xz") as tar:
        names = tar.getnames()
    assert any(n.startswith("./train/") for n in names) and any(n.startswith("./heldout/") for n in names)
    with tarfile.open(carry / "stamo_r250.tar.xz") as tar:
        assert tar.getnames() == ["episodes.pt"]
    assert not list(carry.glob("*.tmp"))
    again = subprocess.run(["bash", str(SCRIPTS / "gpu_prepare.sh")], cwd=SCRIPTS.parent,
                           env={**env, "WHAT": "pm"}, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "holds data already" in again.stdout
    bad = subprocess.run(["bash", str(SCRIPTS / "gpu_prepare.sh")], cwd=SCRIPTS.parent, env={**env, "WHAT": "pmm"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part 'pmm'" in bad.stdout


def test_bench_active_inference_burst_tracer_traces_a_burst_and_leaves_training_unchanged(tmp_path):
    """``--burst-dump``: a steady run flags nothing; an update whose gradient jumps (one batch scaled up) is
    re-run term by term from the parameters and RNG state it started from (the replay's summed gradient equals the
    update's, part by part) and written out; the training itself ends where it ends without the tracer."""
    import torch
    from tensordict import TensorDict

    from latentrl.agents.active_inference import ActiveInferenceAgent

    bench = _load("bench_active_inference")

    def agent():
        torch.manual_seed(0)
        return ActiveInferenceAgent(ActiveInferenceAgent.make_config("smoke", obs_type="state", free_nats=0.0),
                                    (6,), 2)

    g = torch.Generator().manual_seed(1)
    states = torch.randn(8, 3, 6, generator=g)
    batch = TensorDict({"state": states[:, :-1], "action": torch.rand(8, 2, 2, generator=g) * 2 - 1,
                        "has_action": torch.ones(8, 2, dtype=torch.bool),
                        "next": {"state": states[:, 1:], "reward": torch.randn(8, 2, 1, generator=g)}},
                       batch_size=[8, 2])
    burst = batch.clone()
    burst["state"], burst["next", "state"] = burst["state"] * 1e3, burst["next", "state"] * 1e3
    schedule = [batch] * 60 + [burst] + [batch] * 5

    def run(traced: bool):
        a = agent()
        tracer = bench.BurstTracer(a, str(tmp_path / "dump"), 20.0) if traced else None
        torch.manual_seed(3)
        for update, b in enumerate(schedule, start=1):
            if tracer is not None:
                tracer.before(b)
            metrics = {k: float(v) for k, v in a.update(b).items()}
            if tracer is not None:
                tracer.after(update, metrics)
            if update == 61:
                burst_metrics = metrics
        return a, tracer, burst_metrics

    plain, _, _ = run(False)
    traced, tracer, metrics = run(True)
    assert all(torch.equal(v, traced.state_dict()[k]) for k, v in plain.state_dict().items())
    assert [b["update"] for b in tracer.bursts] == [61]
    entry = tracer.bursts[0]
    for part, norm in entry["grad_norm_by_part"].items():
        assert entry["by_term"]["total"][part] == pytest.approx(norm, rel=1e-4), part
    assert entry["by_term"]["total"]["all"] == pytest.approx(metrics["grad_norm"], rel=1e-4)
    dump = torch.load(entry["file"], weights_only=False)
    reference = agent()  # the parameters before update 61: the plain run replayed to update 60
    torch.manual_seed(3)
    for b in schedule[:60]:
        reference.update(b)
    assert all(torch.equal(v, dump["agent_before"][k]) for k, v in reference.state_dict().items())
    # the history filed with it: the last entry is the burst's own update, whose step per part is how far that
    # update moved the parameters (the reference's update 61 from the same state and RNG stream)
    reference.update(schedule[60])
    after = reference.state_dict()
    last = entry["history"][-1]
    assert last["update"] == 61 and len(entry["history"]) == bench.BurstTracer.HISTORY
    for part, params in reference.parameter_groups().items():
        names = [n for n, p in reference.named_parameters() if any(p is q for q in params)]
        moved = torch.stack([(after[n] - dump["agent_before"][n]).norm() for n in names]).norm()
        assert last["step"][part] == pytest.approx(float(moved), rel=1e-4, abs=1e-12), part
    assert last["step"]["encoder"] > 0 and last["grad"]["encoder"] == pytest.approx(metrics["grad_norm_encoder"])


def test_burst_rows_reads_a_burst_dump_and_finds_the_rows_behind_it(tmp_path):
    """``docs/bench_active_inference/burst_rows.py`` on a dump of the tracer: the rows' transition KLs are the
    update's (their mean is its ``kl_transition``), listed largest first; the re-computed gradient is the
    update's; masking the listed slices out of the KL changes the gradient."""
    import torch
    from tensordict import TensorDict

    bench = _load("bench_active_inference")
    burst_rows = _load("burst_rows", STUDIES / "bench_active_inference")
    overrides = ["--set", "free_nats=0", "--set", "batch_size=4"]
    args = bench.parse_args(["--preset", "smoke", *overrides])
    torch.manual_seed(0)
    agent = bench.build_agent(args)
    g = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 256, (4, 1, 6, 64, 64), generator=g, dtype=torch.uint8).expand(4, 3, 6, 64, 64)
    frames = frames.clone()
    frames[1, 2] = torch.randint(0, 256, (6, 64, 64), generator=g, dtype=torch.uint8)  # slice 1 changes at step 1
    batch = TensorDict({"pixels": frames[:, :-1], "action": torch.zeros(4, 2, 2),
                        "has_action": torch.ones(4, 2, dtype=torch.bool), "next": {"pixels": frames[:, 1:]}},
                       batch_size=[4, 2])
    tracer = bench.BurstTracer(agent, str(tmp_path / "dump"), 0.0, min_history=0)
    tracer.before(batch)
    metrics = {k: float(v) for k, v in agent.update(batch).items()}
    tracer.after(1, metrics)
    out = burst_rows.main([tracer.bursts[0]["file"], "--preset", "smoke", *overrides, "--top", "1",
                           "--json", str(tmp_path / "rows.json")])
    assert out["kl_transition"]["mean"] == pytest.approx(metrics["kl_transition"], rel=1e-5)
    assert out["top_rows"][0]["kl_transition"] == out["kl_transition"]["max"]
    assert out["rows"] == 8 and 0 < out["kl_transition"]["top_share"] <= 1
    assert out["by_term"]["total"]["all"] == pytest.approx(metrics["grad_norm"], rel=1e-4)
    assert out["without_top_slices"]["slices"] == [out["top_rows"][0]["slice"]]
    assert out["without_top_slices"]["by_term"]["transition"] != pytest.approx(out["by_term"]["total"]["transition"])
    assert set(out["std_floors"]) == {"0.03", "0.1"} and json.loads((tmp_path / "rows.json").read_text())


def test_bench_active_inference_resume_continues_the_very_run(tmp_path):
    """A model file keeps torch's RNG state with the weights and Adam's: 3 updates, saved, loaded into a fresh
    agent with ``--resume``'s loader and 3 more give the parameters of 6 updates in one go (batches drawn and
    latent samples alike)."""
    import torch
    from tensordict import TensorDict

    bench = _load("bench_active_inference")
    args = bench.parse_args(["--preset", "smoke", "--set", "free_nats=0"])

    class Buffer:  # draws its batches from torch's global RNG, as the replay buffer does
        def sample(self, **kwargs):
            frames = torch.randint(0, 256, (4, 3, 6, 64, 64), dtype=torch.uint8)
            return TensorDict({"pixels": frames[:, :-1], "action": torch.rand(4, 2, 2) * 2 - 1,
                               "has_action": torch.ones(4, 2, dtype=torch.bool), "next": {"pixels": frames[:, 1:]}},
                              batch_size=[4, 2])

    def fresh():
        torch.manual_seed(0)
        return bench.build_agent(args)

    def updates(agent, n):
        for _ in range(n):
            agent.update(Buffer().sample())

    straight = fresh()
    updates(straight, 6)
    first = fresh()
    updates(first, 3)
    bench.save_model_file(first, {"updates": 3}, tmp_path / "m.pt")
    torch.manual_seed(123)  # a new process: its own seed, as main() sets
    resumed = fresh()
    bench.load_model_file(resumed, tmp_path / "m.pt", optimizer=True)
    updates(resumed, 3)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in straight.state_dict().items())


def test_transition_refit_fits_the_transition_alone_to_frozen_beliefs(monkeypatch):
    """``docs/bench_active_inference/transition_refit.py`` on a world whose beliefs are exact (the shift world):
    the refit members predict q(s_{t+1}|o_{t+1}) from (s_t, a_t), so the held-out transition KL falls several-fold,
    and nothing but the transition changes. Refit to the wrong target (the belief now) the KL stays high."""
    import torch

    from latentrl.agents.active_inference import ActiveInferenceAgent

    refit = _load("transition_refit", STUDIES / "bench_active_inference")
    cfg = ActiveInferenceAgent.make_config("smoke")

    def model():
        torch.manual_seed(0)
        wm = ActiveInferenceAgent(cfg, (3, 64, 64), 2).eval().world_model
        d = wm.latent_dim
        monkeypatch.setattr(wm, "posterior", lambda x: (x[:, -3, 0, :d].float() / 255.0,
                                                         torch.full((x.shape[0], d), 0.02)))
        return wm

    wm = model()
    others = {n: p.clone() for n, p in wm.named_parameters() if not n.startswith("transitions.")}
    data = refit.encode_pairs(wm, _ShiftWorld(cfg.latent_dim, 2), 3000, frame_stack=1, chunk=1000)
    assert data["mean1"].shape == (3000, cfg.latent_dim) and data["action"].shape == (3000, 2)
    record = refit.refit(wm, data, steps=1000, lr=3e-3, log_every=500)
    assert record["held_out"] == 600 and record["best_step"] > 0
    assert record["held_kl_best"] < record["held_kl_before"] / 3, record
    assert all(torch.equal(p, others[n]) for n, p in wm.named_parameters() if n in others)
    assert all(p.requires_grad for p in wm.parameters())  # left trainable, as found
    wrong = model()
    wrong_data = {**data, "mean1": data["mean0"], "std1": data["std0"]}  # the target swapped for the belief now
    refit.refit(wrong, wrong_data, steps=1000, lr=3e-3, log_every=500)
    with torch.no_grad(), _load("bench_active_inference").fixed_draws(1):
        assert float(refit.transition_kl(wrong, data, torch.arange(600))) > 2 * record["held_kl_best"]
