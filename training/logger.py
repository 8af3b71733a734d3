"""Run logging: CSV + TensorBoard (TorchRL's loggers), optional wandb, and mp4 videos."""

from __future__ import annotations

import csv
import math
import os
import platform
from pathlib import Path

import numpy as np
import torch

__all__ = ["HAND_WRITTEN", "RunLogger", "machine_description", "processor_name", "write_report_page", "write_video"]


def write_video(path: str | Path, frames: np.ndarray | torch.Tensor, fps: int = 30) -> Path:
    """Write ``frames`` ``[T, 3, H, W]`` or ``[T, H, W, 3]`` uint8 to an mp4 file (H.264 via imageio-ffmpeg)."""
    import imageio.v2 as imageio

    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.ndim != 4:
        raise ValueError(f"expected frames [T, 3, H, W] or [T, H, W, 3], got shape {frames.shape}")
    if frames.shape[1] == 3 and frames.shape[-1] != 3:
        frames = frames.transpose(0, 2, 3, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1 keeps 64x64 frames as they are (the default would rescale them to 16-multiples).
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, quality=8,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame, dtype=np.uint8))
    return path


class RunLogger:
    """Scalars to ``metrics.csv`` (one row per log call, columns grow as new keys appear), TensorBoard
    under ``tb/`` and, when ``wandb`` is set, to Weights & Biases."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "metrics.csv"
        self._columns: list[str] = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                header = next(csv.reader(f), None)
            self._columns = list(header or [])
        self._tb = None
        if tensorboard:
            from torchrl.record.loggers import TensorboardLogger

            self._tb = TensorboardLogger(exp_name="tb", log_dir=str(self.run_dir))
        self._wandb = None
        if wandb_project:
            try:
                import wandb  # noqa: F401
            except ImportError as err:
                raise ImportError("log.wandb_project is set but wandb is not installed: pip install wandb") from err
            from torchrl.record.loggers import WandbLogger

            self._wandb = WandbLogger(exp_name=self.run_dir.name, project=wandb_project, config=config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self._columns]
        if new:
            self._rewrite_with_columns(self._columns + new)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow(row)
        for key, value in metrics.items():
            if math.isfinite(float(value)):
                for logger in (self._tb, self._wandb):
                    if logger is not None:
                        logger.log_scalar(key, float(value), step=step)

    def drop_rows_after(self, step: int) -> int:
        """Remove ``metrics.csv`` rows logged after ``step`` (a resumed run repeats them); returns how many."""
        if not self.csv_path.exists():
            return 0
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if not r.get("step") or float(r["step"]) <= step]
        if len(kept) < len(rows):
            self._rewrite_with_columns(self._columns, kept)
        return len(rows) - len(kept)

    def _rewrite_with_columns(self, columns: list[str], rows: list[dict] | None = None) -> None:
        if rows is None and self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        rows = rows or []
        self._columns = columns
        tmp = self.csv_path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.csv_path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.experiment.flush()
            self._tb.experiment.close()


def processor_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: str | torch.device = "cpu") -> str:
    """One line naming the machine and library versions a measurement ran on (for benchmark reports)."""
    import mujoco
    import torchrl

    device = torch.device(device)
    gpu = f", GPU {processor_name(device)}" if device.type == "cuda" else ""
    return (f"{platform.platform()}, {processor_name('cpu')}, {os.cpu_count()} CPUs{gpu}, "
            f"python {platform.python_version()}, torch {torch.__version__}, torchrl {torchrl.__version__}, "
            f"mujoco {mujoco.__version__}")


HAND_WRITTEN = "<!-- hand-written below: kept when the benchmark script rewrites this page -->"
"""Marker line in a benchmark page: what follows it (the reading of the figures, notes on runs) is written by
people, and :func:`write_report_page` carries it over when the script regenerates the page above it."""


def write_report_page(path: str | Path, generated: str) -> None:
    """Write a benchmark page: ``generated`` (the script's part), then the hand-written part of the page already
    at ``path`` (everything from its :data:`HAND_WRITTEN` line on), so that rerunning a benchmark never drops
    what people wrote there. Written to a temporary file first, then moved into place."""
    path = Path(path)
    kept = ""
    if path.exists():
        old = path.read_text()
        if HAND_WRITTEN in old:
            kept = old[old.index(HAND_WRITTEN):]
    text = generated.rstrip("\n") + "\n"
    if kept:
        text += "\n" + kept.rstrip("\n") + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
