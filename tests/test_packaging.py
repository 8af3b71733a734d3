"""Both install modes give the `latentrl` namespace (and configs) and install no top-level `envs`/`agents`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["envs", "replay", "world_models", "agents", "training", "control", "configs"]

CHECK = """
import importlib.util, json, sys
import latentrl.envs, latentrl.replay, latentrl.world_models, latentrl.agents, latentrl.training
from latentrl.training.cli import load_config
from latentrl.envs.tasks import get_task
cfg = load_config(["agent=rnd", "env=point_mass_maze-loop"])
get_task("point_mass_maze-loop").make_dm_env(0)  # the maze XML ships as package data
print(json.dumps({
    "envs_file": latentrl.envs.__file__,
    "top_level": [m for m in ("envs", "agents", "replay", "training") if importlib.util.find_spec(m)],
    "task": cfg.env.task, "agent": cfg.agent.name,
}))
"""


def _check(python: str, env: dict | None, cwd: Path) -> dict:
    import json

    proc = subprocess.run([python, "-c", CHECK], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_wheel_maps_folders_into_the_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("latentrl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("latentrl/", "latentrl-")) for n in names), sorted({n.split("/")[0] for n in names})
    for sub in SUBPACKAGES:
        assert f"latentrl/{sub}/__init__.py" in names
    assert "latentrl/configs/train.yaml" in names and "latentrl/configs/agent/rnd.yaml" in names
    assert "latentrl/envs/assets/point_mass_maze.xml" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert not (target / "envs").exists() and not (target / "agents").exists()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "MUJOCO_GL": "egl"}
    out = _check(sys.executable, env, tmp_path)
    assert out["envs_file"].startswith(str(target)), out
    assert out["top_level"] == [] and out["task"] == "point_mass_maze-loop" and out["agent"] == "rnd"


def test_editable_install_maps_folders_into_the_namespace(tmp_path):
    # A bare venv that sees this environment's packages (torch, setuptools >= 69 from the dev extra) through a
    # .pth file, not the base interpreter's (whose setuptools may be too old for pyproject.toml).
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(tmp_path / "venv")
    python = str(tmp_path / "venv" / "bin" / "python")
    inner_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    Path(inner_site, "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                    "--no-build-isolation", "-q", "-e", str(ROOT)], check=True, capture_output=True, timeout=300)
    out = _check(python, None, tmp_path)
    assert out["envs_file"] == str(ROOT / "envs" / "__init__.py"), out
    assert out["top_level"] == [] and out["agent"] == "rnd"


def _repository_files(root: Path) -> set[str]:
    """The files git tracks under ``root``; outside a git checkout, every file below it."""
    proc = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=root)
    if proc.returncode == 0:
        return set(proc.stdout.splitlines())
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".git" not in p.parts}


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces made hyphens, a
    repeated heading suffixed -1, -2, ...; lines inside fenced code blocks (shell comments) are not headings."""
    import re

    anchors, seen, fenced = set(), {}, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_doc_links(root: Path) -> list[str]:
    """``page: link`` for each relative markdown link in ``root``'s pages that names no file or folder the
    repository holds (in a git checkout the tracked ones, so a record kept beside a page but ignored by git
    (2026-12-06: a ``runs/`` rule swallowed docs/bench_metra_baselines_pixels/runs/) counts as missing), or a
    ``#section`` that its page has no heading for (a heading renamed under a link: benchmarks.md's link to
    bench_metra.md's GPU section, 2026-12-06)."""
    import functools
    import os
    import re

    files = _repository_files(root)
    held = files | {str(parent) for f in files for parent in Path(f).parents}  # the files and their folders
    anchors = functools.cache(lambda rel: heading_anchors((root / rel).read_text()))  # each linked page read once
    broken = []
    for page in sorted(f for f in files if f.endswith(".md")):
        for link in re.findall(r"\]\(([^)\s]+)\)", (root / page).read_text()):
            target, _, anchor = link.partition("#")
            if "://" in target or target.startswith("mailto:"):
                continue
            rel = os.path.normpath(Path(page).parent / target) if target else page
            if rel.startswith(".."):  # outside the repository (../shared/...): not ours to check
                continue
            if rel not in held or (anchor and rel.endswith(".md") and anchor not in anchors(rel)):
                broken.append(f"{page}: {link}")
    return broken


def test_every_relative_link_in_the_pages_names_a_file_the_repository_holds(tmp_path):
    """The benchmark pages link their figures, records, scripts and each other's sections; a link to a file that
    is not in the repository is a result a reader cannot check, one to a section that is gone lands at the top of
    a long page. Checked on this checkout and on a planted page."""
    assert broken_doc_links(ROOT) == []
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "docs" / "page" / "runs").mkdir(parents=True)
    (tmp_path / "docs" / "page" / "fig.png").write_bytes(b"png")
    (tmp_path / "docs" / "page" / "runs" / "record.json").write_text("{}")  # on disk, ignored by git
    (tmp_path / "docs" / "page.md").write_text(
        "# Top\n## Runs (seed 0, 2026-12-06)\n## Runs (seed 0, 2026-12-06)\n```\n# a shell comment\n```\n"
        "[fig](page/fig.png) [record](page/runs/record.json) [gone](page/missing.png) [web](https://x.org/a#b) "
        "[section](#top) [spec](../../shared/spec.md#x) [folder](page/) [again](#runs-seed-0-2026-12-06-1) "
        "[renamed](#runs-seed-0) [comment](#a-shell-comment) [other page](other.md#notes) "
        "[other, gone](other.md#results) [figure part](page/fig.png#x)\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n### Notes ###\n")
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    assert broken_doc_links(tmp_path) == [
        "docs/page.md: page/runs/record.json", "docs/page.md: page/missing.png", "docs/page.md: #runs-seed-0",
        "docs/page.md: #a-shell-comment", "docs/page.md: other.md#results"]
