"""The built wheel, installed outside the repository, is a working stylegen; its metadata states ranges.

What is tested is the wheel's own contents: it is built from a copy of the packaging inputs (no ``build/`` left
over in the checkout can leak into it), installed with ``--no-deps`` into a fresh venv, and run from a temporary
folder with ``PYTHONPATH`` unset. The fresh venv sees the dependencies of the interpreter running this test through
a ``.pth`` file listing its site-packages folders (installing the heavy stack again would cost minutes and GBs);
a ``.pth`` line only appends a folder to ``sys.path``, so the ``.pth`` files inside it (this checkout's editable
install) are not processed, and ``import pipeline`` can only find the wheel's copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^planned=(\d+) kept=(\d+) rejected=(\d+) failed=(\d+) skipped=(\d+)$")
HEAVY = ("torch", "torchvision", "ray", "diffusers", "transformers", "open-clip-torch", "pyarrow", "numpy")
BUILD_INPUTS = ("pyproject.toml", "README.md", "requirements.lock", "operators", "pipeline", "jobs")


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version
    return pins


def build_wheel(dest: Path) -> Path:
    src = dest / "src"
    src.mkdir(parents=True)
    for name in BUILD_INPUTS:  # symlinks kept: jobs/requirements.lock -> ../requirements.lock, as in the checkout
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "-w", str(dest / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (dest / "dist").glob("stylegen-*.whl")
    return wheel


def fresh_venv(root: Path) -> Path:
    """A venv without pip whose ``sys.path`` ends with this interpreter's site-packages folders."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    deps = list(dict.fromkeys([*(p for p in deps if p in ours), *deps]))
    Path(purelib, "zz-test-interpreter-deps.pth").write_text("\n".join(deps) + "\n")
    return python


def write_inputs(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, names in (("content", ("a", "b")), ("style", ("x", "y"))):
        (folder / sub).mkdir(parents=True)
        for name in names:
            pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / sub / f"{name}.png")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_metadata_states_ranges_that_hold_the_locked_set(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
        shipped_lock = zf.read("jobs/requirements.lock").decode()
    assert {"operators/ad/__init__.py", "operators/ad/flux.py", "pipeline/generate/run.py", "jobs/cli.py"} <= names
    assert not any(n.startswith(("tests/", "configs/", "benchmarks/", "scripts/", "data/")) for n in names)
    assert shipped_lock == (REPO / "requirements.lock").read_text()  # the link became the file's content
    assert meta["Requires-Python"] and "3.11" in meta["Requires-Python"]

    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    by_name = {canonicalize_name(r.name): r for r in requires if r.marker is None}
    for name in HEAVY:
        spec = by_name[name].specifier
        assert not any(s.operator in ("==", "===") for s in spec), f"{name} is pinned: {spec}"
        assert any(s.operator in (">=", "~=") for s in spec), f"{name} has no lower bound: {spec}"
    pins = locked()
    for req in requires:  # the tested set lies inside every range (runtime and the test extra)
        if req.marker is None or req.marker.evaluate({"extra": "test"}):
            name = canonicalize_name(req.name)
            assert name in pins, f"{name} is required but not in requirements.lock"
            assert req.specifier.contains(pins[name], prereleases=True), f"locked {name}=={pins[name]} not in {req}"


@pytest.mark.slow
def test_installed_wheel_runs_a_tiny_config_outside_the_repository(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--quiet", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the wheel's Requires-Dist (with Requires-Python) holds in this environment (in CI: the locked set)
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "check"], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-2000:]
    stylegen = tmp_path / "venv" / "bin" / "stylegen"

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(STYLEGEN_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")

    def run(*args, timeout=300):
        proc = subprocess.run([str(a) for a in args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
        return proc.stdout

    site = str(tmp_path / "venv")
    where = run(python, "-c", "import pipeline, operators.ad, jobs.submit as s; "
                "print(pipeline.__file__); print(operators.ad.__file__); print(s.PROJECT_ROOT); "
                "print(len(s.requirements()))").splitlines()
    assert where[0].startswith(site) and where[1].startswith(site), where  # the wheel's code, not the checkout's
    assert where[2] == "None" and int(where[3]) > 20, where  # no checkout; --ship-deps finds the lock in the wheel

    assert "wrote tiny clip" in run(stylegen, "models", "tiny", "clip", "clip")
    write_inputs(work / "data")
    cfg = {
        "output": {"path": "out", "samples_per_shard": 2, "image_format": "png"},
        "content": {"images": "data/content/"},
        "style": {"images": "data/style/"},
        "pairing": {"styles_per_content": 2, "seeds_per_pair": 1, "seed": 0},
        "decode": {"max_side": 64},
        "operator": {"name": "color-transfer", "params": {"strength": 0.85}, "batch_size": 2},
        "scoring": {"clip_model": "clip", "clip_pretrained": "none", "batch_size": 4},
        "filter": {"min_content": None, "min_style": None},
    }
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert "planned=4" in run(stylegen, "validate", "cfg.yaml")

    last = run(stylegen, "run", "cfg.yaml", "--quiet", timeout=600).strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, last
    planned, kept, rejected, failed, skipped = map(int, match.groups())
    assert (planned, failed, skipped) == (4, 0, 0) and kept + rejected == 4 and kept > 0, last

    import pyarrow.parquet as pq

    rows = pq.read_table(str(work / "out" / "index")).to_pylist()
    assert len(rows) == 4 and sum(r["status"] == "kept" for r in rows) == kept
    tars = sorted((work / "out" / "shards").glob("*.tar"))
    assert tars
    import tarfile

    members = [m.name for t in tars for m in tarfile.open(t).getmembers()]
    assert sum(n.endswith(".png") for n in members) == kept
