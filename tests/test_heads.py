"""Quality heads on the CLIP image embedding: published layouts, the .pth converter, config rules, and the
runtime_env / dependency probe of submitted jobs (issue 17)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from operators.heads import HeadError, HeadSet, convert_head, load_head, tiny_head
from pipeline.config import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]


class _LaionAesthetic(torch.nn.Module):
    """The published improved-aesthetic-predictor module (its key names: layers.0 ... layers.7)."""

    def __init__(self, dim: int):
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class _NsfwModel(torch.nn.Module):
    """NeMo Curator's port of LAION's CLIP-based NSFW detector (norm.mean/variance, linear_1..linear_4)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.Module()
        self.norm.register_buffer("mean", torch.randn(dim) * 0.01)
        self.norm.register_buffer("variance", torch.rand(dim) * 0.01 + 0.001)
        self.linear_1, self.linear_2 = torch.nn.Linear(dim, 64), torch.nn.Linear(64, 512)
        self.linear_3, self.linear_4 = torch.nn.Linear(512, 256), torch.nn.Linear(256, 1)

    def forward(self, x):
        x = (x - self.norm.mean) / self.norm.variance.sqrt()
        for lin in (self.linear_1, self.linear_2, self.linear_3):
            x = torch.relu(lin(x))
        return torch.sigmoid(self.linear_4(x))


@pytest.mark.parametrize("module, layout", [(_LaionAesthetic, "aesthetic"), (_NsfwModel, "nsfw")])
def test_converted_pth_scores_like_the_published_module_and_its_safetensors(tmp_path, module, layout):
    torch.manual_seed(0)
    published = module(768).eval()
    torch.save(published.state_dict(), tmp_path / "head.pth")
    converted = convert_head(tmp_path / "head.pth", tmp_path / "head.safetensors")
    assert converted.spec.layers == {"aesthetic": (1024, 128, 64, 16, 1), "nsfw": (64, 512, 256, 1)}[layout]
    emb = torch.nn.functional.normalize(torch.randn(6, 768), dim=-1)
    loaded = load_head(str(tmp_path / "head.safetensors"), 768)
    with torch.no_grad():
        expected = published(emb).squeeze(-1)
        assert torch.allclose(converted(emb), expected, atol=1e-5)
        assert torch.equal(loaded(emb), converted(emb))  # the file scores identically to the converted weights
    if layout == "nsfw":
        assert ((expected >= 0) & (expected <= 1)).all()


def test_converter_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"layers.0.weight": Evil()}, protocol=2))
    with pytest.raises(HeadError, match="not a plain state dict"):
        convert_head(tmp_path / "evil.pth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "conv.pth")
    with pytest.raises(HeadError, match="no linear layer"):
        convert_head(tmp_path / "conv.pth", tmp_path / "out.safetensors")


def test_tiny_heads_are_deterministic_finite_and_in_range(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    heads = HeadSet({"aesthetic": {"weights": "tiny"}, "nsfw": {"weights": "tiny"}}, 64)
    scores = heads(emb)
    again = HeadSet({"aesthetic": {"weights": "tiny"}, "nsfw": {"weights": "tiny"}}, 64)(emb)
    assert scores == again
    assert all(torch.isfinite(torch.tensor(v)).all() for v in scores.values())
    assert all(0 <= p <= 1 for p in scores["nsfw"]) and len(set(scores["aesthetic"])) == 32
    assert tiny_head("linear", 64).spec.layers == (1,)
    from operators.heads import save_head

    path = save_head(tiny_head("aesthetic", 768), tmp_path / "a.safetensors")
    with pytest.raises(HeadError, match="takes 768-d embeddings, the CLIP model gives 64-d"):
        load_head(str(path), 64)


def _run_cfg(**scoring_filter):
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for section, values in scoring_filter.items():
        data.setdefault(section, {}).update(values)
    return data


@pytest.mark.parametrize("overrides, needle", [
    ({"filter": {"min_scores": {"aesthetc": 5}}, "scoring": {"heads": {"aesthetic": {"weights": "tiny"}}}},
     "filter.min_scores.aesthetc: no such head"),
    ({"scoring": {"heads": {"Bad-Name": {"weights": "tiny"}}}}, "head name"),
    ({"scoring": {"heads": {"aesthetic": {"weights": "sac+logos.pth"}}}}, "convert-head"),
    ({"scoring": {"heads": {"aesthetic": {"weights": "/no/such.safetensors"}}}}, "not found"),
])
def test_head_config_errors_name_the_key(overrides, needle):
    for kind in ("run", "filter"):
        data = _run_cfg(**overrides) if kind == "run" else {
            "input": {"shards": "/x/*.tar"}, "output": {"path": "/tmp/o"}, **overrides}
        with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
            validate_config(data, schema="auto")


def test_filter_configs_are_told_apart_by_keys_or_kind():
    from pipeline.config import FilterRunConfig

    by_keys = validate_config({"input": {"shards": "/x/*.tar"}, "output": {"path": "/o"}}, schema="auto")
    by_kind = validate_config({"kind": "filter", "input": {"shards": "/x/*.tar"}, "output": {"path": "/o"}},
                              schema="auto")
    assert isinstance(by_keys, FilterRunConfig) and isinstance(by_kind, FilterRunConfig)
    assert type(validate_config(_run_cfg() | {"kind": "run"}, schema="auto")).__name__ == "RunConfig"


def test_filter_hash_of_configs_without_heads_is_unchanged():
    from pipeline.config import FilterRunConfig

    base = {"input": {"shards": "/x/*.tar"}, "output": {"path": "/o"}, "filter": {"top_fraction": 0.3}}
    cfg = FilterRunConfig.model_validate(base)
    assert cfg.filter_hash() == "74794b6908c38ee5"  # the hash of this config before heads existed
    heads = FilterRunConfig.model_validate(base | {"scoring": {"heads": {"nsfw": {"weights": "tiny"}}}})
    assert heads.filter_hash() != cfg.filter_hash()


# ---- submitted jobs: runtime_env and the dependency probe ----------------------------------------------------
def _filter_cfg(**ray):
    from pipeline.config import FilterRunConfig

    return FilterRunConfig.model_validate({"input": {"shards": "/data/*.tar"}, "output": {"path": "/out"},
                                           "ray": ray})


def test_runtime_env_merges_the_configs_and_ships_pinned_deps():
    from jobs import submit

    cfg = _filter_cfg(runtime_env={"env_vars": {"HF_HOME": "/models"}, "excludes": ["data/"],
                                   "py_executable": "/opt/env/bin/python"})
    env = submit.runtime_env(cfg)
    assert env["py_executable"] == "/opt/env/bin/python" and env["env_vars"]["HF_HOME"] == "/models"
    assert submit.CONFIG_ENV in env["env_vars"] and "data/" in env["excludes"] and ".venv" in env["excludes"]
    assert env["working_dir"] == str(REPO) and "pip" not in env
    assert submit.entrypoint(cfg).startswith("python -m jobs.depcheck torch ")
    assert "&& python -m jobs.cli filter env:" in submit.entrypoint(cfg)

    pins = submit.requirements()  # requirements.lock's runtime section: the tested set, exact
    assert "torch==2.14.1" in pins and "typer==0.29.2" in pins and all("==" in p for p in pins)
    assert not any(p.lower().startswith(("pytest==", "ruff==", "moto==")) for p in pins)  # test tools stay home
    for tool in ("pip", "uv"):
        shipped = submit.runtime_env(_filter_cfg(), ship_deps=tool)
        assert shipped[tool] == {"packages": pins}
    deps = submit.dependencies()  # the probe checks the direct dependencies (ranges in pyproject.toml)
    assert "torch>=2.14,<3" in deps and not any("==" in d for d in deps)
    assert {"PIL", "yaml", "open_clip", "faiss", "typer", "ray"} <= set(submit.import_names(deps))
    with pytest.raises(ConfigError, match="already sets py_executable"):
        submit.runtime_env(cfg, ship_deps="pip")
    with pytest.raises(ConfigError, match="working_dir"):
        submit.runtime_env(_filter_cfg(runtime_env={"working_dir": "/elsewhere"}))
    with pytest.raises(ConfigError, match="input.shards"):
        from pipeline.config import FilterRunConfig

        submit.check_submittable(FilterRunConfig.model_validate({"input": {"shards": "rel/*.tar"},
                                                                 "output": {"path": "/out"}}))


def test_runtime_env_from_a_wheel_install_ships_the_packages_not_site_packages(monkeypatch):
    """Installed from a wheel there is no checkout: the job gets the three installed packages as py_modules (the
    user's py_modules after them), never the site-packages folder as its working_dir; --ship-deps still works."""
    from jobs import submit

    monkeypatch.setattr(submit, "PROJECT_ROOT", None)
    env = submit.runtime_env(_filter_cfg(runtime_env={"py_modules": ["/opt/extra"]}), ship_deps="pip")
    assert "working_dir" not in env
    assert env["py_modules"] == [str(submit.PACKAGE_PARENT / n) for n in ("operators", "pipeline", "jobs")] + \
        ["/opt/extra"]
    assert env["pip"] == {"packages": submit.requirements()} and env["pip"]["packages"]


def test_submission_id_depends_only_on_what_the_config_sets():
    """A key left at its default (or one a later release adds with a default) keeps the job id, so a resubmission
    finds its running job instead of starting a second writer; a changed value or --ship-deps changes it."""
    from jobs import submit
    from pipeline.config import FilterRunConfig

    base = {"input": {"shards": "/in/*.tar"}, "output": {"path": "/out"}}
    plain = FilterRunConfig.model_validate(base)
    explicit = FilterRunConfig.model_validate({**base, "ray": {"wait_for_actors_s": 600}})
    other = FilterRunConfig.model_validate({**base, "ray": {"wait_for_actors_s": 601}})
    assert submit.submission_base(plain) == submit.submission_base(explicit)

    class Upgraded(FilterRunConfig):  # the next release adds a key with a default
        future_key: int = 3

    assert submit.submission_base(Upgraded.model_validate(base)) == submit.submission_base(plain)
    assert submit.submission_base(plain) != submit.submission_base(other)
    assert submit.submission_base(plain) != submit.submission_base(plain, ship_deps="pip")


def test_dependency_probe_prints_one_line_naming_the_missing_module():
    ok = subprocess.run([sys.executable, "-m", "jobs.depcheck", "json", "yaml"], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    bad = subprocess.run([sys.executable, "-m", "jobs.depcheck", "yaml", "no_such_module_xyz"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    lines = bad.stderr.splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("error: the cluster's python") and "cannot import no_such_module_xyz:" in lines[0]
    assert "--ship-deps" in lines[0] and "yaml" not in lines[0].split("cannot import")[1].split(":")[0]
