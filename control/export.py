"""Export a Policy to ONNX (onnxruntime) or ``torch.export`` (``.pt2``), its carry as explicit inputs and outputs.

The exported graph is ``(obs.<key>..., carry.<path>..., is_first) -> (action, next_carry.<path>...)``
(rsl_rl's ``_OnnxRNNModel``: the recurrent state goes in and comes out, it is never a buffer).
Names: observation keys sorted; carry leaves sorted by their path, nested keys joined by ``.``;
``is_first`` bool ``[B]``; axis 0 of everything is the dynamic ``batch``. Rows with ``is_first``
restart from the policy's fresh carry inside the graph (``torch.where``), so a deployment feeds zeros
and ``is_first=True`` at an episode's first step. uint8 pixels go in; normalisation and the frame
stack are inside the graph.

What cannot be exported says so (:class:`PolicyNotExportableError`) and runs in-process:
``uses_autograd`` policies (PV-RNN's error regression optimises inside ``step``), planners that
search with per-step random draws (active inference's CEM / shooting over imagined rollouts), and
policies that draw per-episode random values at an episode's start (a METRA or FB/TD-JEPA policy
without a task draws its skill / z from the prior: fix one with a task first).
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import Tensor, nn

__all__ = ["OnnxPolicy", "PolicyNotExportableError", "TorchExportPolicy", "export_policy", "load_exported"]

EXPORT_FORMAT = "latentrl.export/1"
OPSET = 20
FORMATS = ("onnx", "torch_export")

# Policies whose step cannot become a static graph, and why (class name -> reason).
NOT_EXPORTABLE = {
    "ActiveInferencePolicy": "it plans at every step: a cross-entropy-method / shooting search over imagined rollouts "
                             "with per-env torch.Generator draws seeded from the carry (a search, not a function "
                             "graph)",
}


class PolicyNotExportableError(RuntimeError):
    """This policy cannot be exported; run it in-process (``scripts/run_control_loop.py model=<dir>``)."""


def _leaf_name(key) -> str:
    return ".".join(key) if isinstance(key, tuple) else str(key)


def _leaf_path(key) -> tuple[str, ...]:
    return key if isinstance(key, tuple) else (key,)


def carry_keys(carry: TensorDict) -> list[tuple[str, ...]]:
    """Every leaf path of a carry, sorted (tensordict flattens in insertion order: sort explicitly)."""
    return sorted(_leaf_path(k) for k in carry.keys(include_nested=True, leaves_only=True))


def check_exportable(policy: nn.Module) -> None:
    """Raise :class:`PolicyNotExportableError` naming why ``policy`` cannot be exported (see the module doc)."""
    name = type(policy).__name__
    if getattr(policy, "uses_autograd", False):
        raise PolicyNotExportableError(
            f"{name} cannot be exported: it uses autograd inside step() (error regression optimises the latent "
            "state by gradient descent at every step, which torch.export and ONNX cannot trace). Run it in-process: "
            "scripts/run_control_loop.py model=<dir> (backend=torch)")
    if name in NOT_EXPORTABLE:
        raise PolicyNotExportableError(f"{name} cannot be exported: {NOT_EXPORTABLE[name]}. Run it in-process: "
                                       "scripts/run_control_loop.py model=<dir> (backend=torch)")
    if getattr(policy, "explore", False):
        raise PolicyNotExportableError(f"{name} was built with explore=True: its actions are random draws; export "
                                       "the deterministic policy (load_policy(..., explore=False))")
    fresh = policy.init_carry(2)
    for seed in (0, 1):
        torch.manual_seed(seed)
        drawn = policy.start_episode(2)
        for key in carry_keys(fresh):
            if not torch.equal(drawn[key], fresh[key]):
                raise PolicyNotExportableError(
                    f"{name} cannot be exported: it draws {_leaf_name(key)!r} at random at each episode's start "
                    "(a skill or task vector from the prior). Export a policy fixed to a task (METRA: a skill or "
                    "goal task; TD-JEPA / FB: a reward or goal task, e.g. eval_zero_shot.py's model with task.z), "
                    "or run it in-process")
    one = policy.init_carry(1)
    for key in carry_keys(fresh):
        if not torch.equal(fresh[key], one[key].expand_as(fresh[key])):
            raise PolicyNotExportableError(
                f"{name} cannot be exported: its fresh carry differs per env ({_leaf_name(key)!r}: one task per env); "
                "export a policy with one task for every env")


class _ExportedStep(nn.Module):
    """``policy.step`` as a function of plain tensors, with restarts by ``torch.where`` (no tensor ``if``)."""

    def __init__(self, policy: nn.Module, obs_keys: list[str], keys: list[tuple[str, ...]]):
        super().__init__()
        self.policy, self.obs_keys, self.keys = policy, obs_keys, keys
        fresh = policy.init_carry(1)
        for i, key in enumerate(keys):
            self.register_buffer(f"fresh_{i}", fresh[key].clone())

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        n_obs, n_carry = len(self.obs_keys), len(self.keys)
        obs, leaves, is_first = inputs[:n_obs], inputs[n_obs:n_obs + n_carry], inputs[-1]
        batch = is_first.shape[0]
        restarted = {}
        for i, (key, leaf) in enumerate(zip(self.keys, leaves, strict=True)):
            fresh = getattr(self, f"fresh_{i}").expand(batch, *leaf.shape[1:])
            mask = is_first.reshape(batch, *([1] * (leaf.dim() - 1)))
            restarted[key] = torch.where(mask, fresh, leaf)
        carry = TensorDict({}, batch_size=[batch])
        for key, value in restarted.items():
            carry[key] = value
        policy = self.policy
        x = obs[self.obs_keys.index(policy.obs_key)] if policy.obs_key is not None else None
        if policy.frame_stack > 1:
            x, carry = policy._stack_frames(x, carry, is_first)
        action, carry = policy.act(x, carry, is_first)
        return (action, *[carry[key] for key in self.keys])


def _spec(t: Tensor) -> dict:
    return {"shape": ["batch", *list(t.shape[1:])], "dtype": str(t.dtype).replace("torch.", "")}


def export_policy(policy: nn.Module | str | Path, out_dir: str | Path | None = None, *,
                  formats: tuple[str, ...] = ("onnx",), batch: int = 2, rate_hz: float | None = None,
                  model_config: dict | None = None) -> dict:
    """Export ``policy`` (or the policy of a model directory) to ``out_dir`` (default ``<model dir>/export``):
    ``policy.onnx`` (one file, opset 20), ``policy.pt2`` (``torch.export.save``) and ``export.json``
    (ordered input / output names, shapes, dtypes, key paths, opset, rate, action spec, versions).
    Returns the ``export.json`` contents. Raises :class:`PolicyNotExportableError` with the reason."""
    if isinstance(policy, (str, Path)):
        from latentrl.agents.model_files import load_policy, read_model_config

        model_dir = Path(policy)
        model_config = model_config or read_model_config(model_dir)
        policy = load_policy(model_dir)
        out_dir = Path(out_dir) if out_dir is not None else model_dir / "export"
    if out_dir is None:
        raise ValueError("give out_dir when exporting a policy object")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; valid: {', '.join(FORMATS)}")
    policy = policy.eval().to("cpu")
    check_exportable(policy)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obs_keys = [policy.obs_key] if policy.obs_key is not None else []
    init = policy.init_carry(batch)
    keys = carry_keys(init)
    wrapper = _ExportedStep(policy, obs_keys, keys).eval()
    gen = torch.Generator().manual_seed(0)
    obs_shape = (policy.obs_shape if policy.obs_key != "pixels" else policy.obs_shape)
    if policy.obs_key == "pixels":
        example_obs = [torch.randint(0, 256, (batch, *obs_shape), dtype=torch.uint8, generator=gen)]
    else:
        example_obs = [torch.randn(batch, *obs_shape, generator=gen)] if obs_keys else []
    is_first = torch.ones(batch, dtype=torch.bool)
    args = (*example_obs, *[init[k] for k in keys], is_first)
    dim = torch.export.Dim("batch", min=1, max=4096)
    dynamic = (tuple({0: dim} for _ in args),)
    input_names = [f"obs.{k}" for k in obs_keys] + [f"carry.{_leaf_name(k)}" for k in keys] + ["is_first"]
    output_names = ["action"] + [f"next_carry.{_leaf_name(k)}" for k in keys]
    with torch.no_grad():
        outputs = wrapper(*args)
    files = {}
    try:
        if "torch_export" in formats:
            with torch.no_grad():
                program = torch.export.export(wrapper, args, dynamic_shapes=dynamic)
            torch.export.save(program, str(out_dir / "policy.pt2"))
            files["torch_export"] = "policy.pt2"
        if "onnx" in formats:
            with torch.no_grad():
                program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=dynamic, input_names=input_names,
                                            output_names=output_names, opset_version=OPSET, external_data=False,
                                            verbose=False)
            program.save(str(out_dir / "policy.onnx"))
            files["onnx"] = "policy.onnx"
    except PolicyNotExportableError:
        raise
    except Exception as err:  # noqa: BLE001 - a tracing failure means: not exportable, say why
        raise PolicyNotExportableError(
            f"{type(policy).__name__} could not be traced for export ({type(err).__name__}: {str(err)[:600]}). "
            "Typical causes: a Python `if` on a tensor value (use torch.where), sampling in step(), autograd. "
            "Run it in-process instead.") from err
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    meta = {
        "format": EXPORT_FORMAT,
        "files": files,
        "policy": type(policy).__name__,
        "agent": (model_config or {}).get("agent"),
        "inputs": [{"name": n, "path": ["obs", k], **_spec(t)} for n, k, t in zip(input_names, obs_keys, example_obs,
                                                                                     strict=False)]
        + [{"name": f"carry.{_leaf_name(k)}", "path": ["carry", *k], **_spec(init[k])} for k in keys]
        + [{"name": "is_first", "path": ["is_first"], **_spec(is_first)}],
        "outputs": [{"name": "action", "path": ["action"], **_spec(outputs[0])}]
        + [{"name": f"next_carry.{_leaf_name(k)}", "path": ["next_carry", *k], **_spec(t)}
           for k, t in zip(keys, outputs[1:], strict=True)],
        "obs_keys": obs_keys,
        "opset": OPSET,
        "rate_hz": rate_hz if rate_hz is None or math.isfinite(rate_hz) else None,
        "action": {"shape": [int(policy.action_dim)], "low": -1.0, "high": 1.0, "dtype": "float32"},
        "env": (model_config or {}).get("env"),
        "versions": versions,
    }
    (out_dir / "export.json").write_text(json.dumps(meta, indent=2))
    return meta


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "uint8": torch.uint8, "bool": torch.bool,
           "int64": torch.int64, "int32": torch.int32}


class _ExportedPolicy:
    """The Policy interface (``init_carry`` / ``step``) over an exported graph, for the control loop."""

    uses_autograd = False
    obs_key: str | None

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        file = self.folder / "export.json"
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist; export first: scripts/export_policy.py model=<dir>")
        self.meta = json.loads(file.read_text())
        if self.meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{file} has format {self.meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
        self.obs_keys = tuple(self.meta["obs_keys"])
        self.obs_key = self.obs_keys[0] if self.obs_keys else None
        self.carry_inputs = [i for i in self.meta["inputs"] if i["path"][0] == "carry"]
        self.action_dim = int(self.meta["action"]["shape"][0])

    def init_carry(self, batch_size: int) -> TensorDict:
        """Zeros of every carry leaf: the graph restarts rows with ``is_first`` from the policy's fresh carry."""
        carry = TensorDict({}, batch_size=[int(batch_size)])
        for spec in self.carry_inputs:
            carry[tuple(spec["path"][1:])] = torch.zeros(int(batch_size), *spec["shape"][1:],
                                                         dtype=_DTYPES[spec["dtype"]])
        return carry

    def _inputs(self, obs: TensorDict, carry: TensorDict, is_first) -> list[Tensor]:
        n = carry.batch_size[0]
        first = torch.as_tensor(is_first, dtype=torch.bool).reshape(-1).expand(n).contiguous()
        out = [obs[k] for k in self.obs_keys]
        out += [carry[tuple(spec["path"][1:])] for spec in self.carry_inputs]
        return [*out, first]

    def _carry(self, leaves, n: int) -> TensorDict:
        carry = TensorDict({}, batch_size=[n])
        for spec, value in zip(self.carry_inputs, leaves, strict=True):
            carry[tuple(spec["path"][1:])] = value
        return carry


class OnnxPolicy(_ExportedPolicy):
    """``policy.onnx`` in onnxruntime (CPU, ``threads`` intra-op threads, sequential execution)."""

    def __init__(self, folder: str | Path, threads: int = 1, providers: list[str] | None = None):
        super().__init__(folder)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(self.folder / self.meta["files"]["onnx"]), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        expected = [i["name"] for i in self.meta["inputs"]]
        if self.input_names != expected:
            raise ValueError(f"{self.folder}: policy.onnx takes inputs {self.input_names}, export.json says {expected}")

    def step(self, obs: TensorDict, carry: TensorDict, is_first) -> tuple[Tensor, TensorDict]:
        inputs = self._inputs(obs, carry, is_first)
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs, strict=True)}
        out = self.session.run(None, feed)
        return torch.from_numpy(out[0]), self._carry([torch.from_numpy(x) for x in out[1:]], carry.batch_size[0])


class TorchExportPolicy(_ExportedPolicy):
    """``policy.pt2`` (``torch.export.load(...).module()``), run in PyTorch without the latentrl policy code."""

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        self.module = torch.export.load(str(self.folder / self.meta["files"]["torch_export"])).module()

    def step(self, obs: TensorDict, carry: TensorDict, is_first) -> tuple[Tensor, TensorDict]:
        with torch.no_grad():
            out = self.module(*self._inputs(obs, carry, is_first))
        return out[0], self._carry(out[1:], carry.batch_size[0])


def load_exported(folder: str | Path, backend: str = "onnx", threads: int = 1):
    """An exported policy of ``folder`` (``<model dir>/export``) on ``backend`` ``"onnx"`` or ``"torch_export"``."""
    if backend == "onnx":
        return OnnxPolicy(folder, threads=threads)
    if backend in ("torch_export", "pt2"):
        return TorchExportPolicy(folder)
    raise ValueError(f"unknown exported backend {backend!r}; use 'onnx' or 'torch_export'")


def example_observations(meta: dict, batch: int, generator: torch.Generator) -> TensorDict:
    """Random observations ``[batch]`` of the exported policy's inputs (uint8 pixels, normal states)."""
    out = TensorDict({}, batch_size=[batch])
    for spec in meta["inputs"]:
        if spec["path"][0] != "obs":
            continue
        shape = (batch, *spec["shape"][1:])
        if spec["dtype"] == "uint8":
            out[spec["path"][1]] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        else:
            out[spec["path"][1]] = torch.randn(shape, generator=generator).to(_DTYPES[spec["dtype"]])
    return out


def parity_check(policy, exported, meta: dict, *, steps: int = 50, batch: int = 3, seed: int = 0,
                 restart_at: int = 17) -> dict[str, float]:
    """Largest differences between the eager ``policy.step`` and an exported policy over ``steps`` steps of
    ``batch`` envs, each side feeding back its own carry (``is_first`` for every row at step 0, for row 1
    at ``restart_at``); the observations are random. Returns ``{"action": ..., "carry": ...}``."""
    g = torch.Generator().manual_seed(seed)
    carry, ex_carry = policy.init_carry(batch), exported.init_carry(batch)
    worst = {"action": 0.0, "carry": 0.0}
    for t in range(steps):
        obs = example_observations(meta, batch, g)
        first = torch.zeros(batch, dtype=torch.bool)
        if t == 0:
            first[:] = True
        elif t == restart_at and batch > 1:
            first[1] = True
        with torch.inference_mode():
            action, carry = policy.step(obs, carry, first)
        ex_action, ex_carry = exported.step(obs, ex_carry, first)
        worst["action"] = max(worst["action"], float((action - ex_action).abs().max()))
        for key in carry_keys(carry):
            a, b = carry[key], ex_carry[key]
            diff = (a.double() - b.double()).abs().max() if a.numel() else torch.tensor(0.0)
            worst["carry"] = max(worst["carry"], float(diff))
    return worst
