"""pipeline.config: the strict YAML schema, --set overrides and the operator hash (docs/architecture.md §4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, RunConfig, apply_overrides, load_config, validate_config
from tests.unit_helpers import REPO

MINIMAL = {
    "output": {"path": "out/x"},
    "content": {"prompts": "prompts.txt"},
    "style": {"images": "styles/"},
}


def write_yaml(tmp_path: Path, data, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def with_section(section: str, **values) -> dict:
    data = {k: dict(v) for k, v in MINIMAL.items()}
    data.setdefault(section, {}).update(values)
    return data


def config_error(tmp_path: Path, data) -> str:
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, f"error does not name the file: {message}"
    assert "\n" not in message, "a ConfigError is printed as one line"
    return message


def test_demo_config_loads_with_the_values_in_the_file():
    path = REPO / "configs" / "demo.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.output.path == raw["output"]["path"]
    assert cfg.output.samples_per_shard == raw["output"]["samples_per_shard"]
    assert cfg.content.images == raw["content"]["images"]
    assert cfg.style.images == raw["style"]["images"]
    assert cfg.operator.name == raw["operator"]["name"]
    assert cfg.operator.params == raw["operator"]["params"]
    assert cfg.pairing.styles_per_content == raw["pairing"]["styles_per_content"]
    assert cfg.decode.max_side == raw["decode"]["max_side"]


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, MINIMAL))
    assert cfg.output.samples_per_shard == 256
    assert cfg.output.image_format == "png"
    assert cfg.pairing.styles_per_content == 1 and cfg.pairing.seeds_per_pair == 1
    assert cfg.pairing.limit is None
    assert cfg.filter.min_content is None and cfg.filter.min_style is None
    assert cfg.ray.address is None


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    data = dict(MINIMAL, outptu={"path": "y"})
    message = config_error(tmp_path, data)
    assert "outptu" in message
    assert "unknown key" in message


def test_unknown_nested_key_names_dotted_key(tmp_path):
    message = config_error(tmp_path, with_section("output", sampels_per_shard=3))
    assert "output.sampels_per_shard" in message
    assert "unknown key" in message


def test_unknown_key_two_levels_deep_is_an_error(tmp_path):
    message = config_error(tmp_path, with_section("decode", max_sidee=12))
    assert "decode.max_sidee" in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("output", "samples_per_shard", "lots"),
        ("output", "include_inputs", [1, 2]),
        ("pairing", "styles_per_content", {"a": 1}),
        ("operator", "batch_size", 2.5),
        ("output", "image_format", "gif"),
        ("filter", "min_style", "high"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, section, key, value):
    message = config_error(tmp_path, with_section(section, **{key: value}))
    assert f"{section}.{key}" in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("operator", "batch_size", -1),
        ("operator", "batch_size", 0),
        ("operator", "actors", [2, 1]),
        ("operator", "actors", [0, 1]),
        ("scoring", "actors", [1, 2, 3]),
        ("output", "samples_per_shard", 0),
        ("output", "jpeg_quality", 101),
        ("pairing", "limit", -1),
        ("pairing", "seed", -3),
        ("filter", "min_content", 1.5),
        ("decode", "max_pixels", 1),
    ],
)
def test_out_of_range_numbers_are_rejected(tmp_path, section, key, value):
    message = config_error(tmp_path, with_section(section, **{key: value}))
    assert f"{section}.{key}" in message


@pytest.mark.parametrize("actors", [[None, 2], [[1], 2], [1.5, 2]])
def test_malformed_actors_give_config_error(tmp_path, actors):
    message = config_error(tmp_path, with_section("operator", actors=actors))
    assert "operator.actors" in message


def test_actors_accept_a_single_int_and_a_pair(tmp_path):
    cfg = load_config(write_yaml(tmp_path, with_section("operator", actors=3)))
    assert tuple(cfg.operator.actors) == (3, 3)
    cfg = load_config(write_yaml(tmp_path, with_section("scoring", actors=[1, 4])))
    assert tuple(cfg.scoring.actors) == (1, 4)


@pytest.mark.parametrize("content", [{}, {"prompts": None, "images": None}, {"prompts": "", "images": ""}])
def test_content_needs_prompts_or_images(tmp_path, content):
    data = dict(MINIMAL, content=content)
    message = config_error(tmp_path, data)
    assert "content" in message
    assert "prompts" in message and "images" in message


def test_missing_required_section_is_named(tmp_path):
    data = {k: v for k, v in MINIMAL.items() if k != "style"}
    message = config_error(tmp_path, data)
    assert "style" in message


def test_unknown_operator_name(tmp_path):
    message = config_error(tmp_path, with_section("operator", name="sisi"))
    assert "operator.name" in message
    assert "sisi" in message


@pytest.mark.parametrize("text", ["output: [unclosed\n", "output:\n  path: x\n bad-indent: 1\n", "a: b: c\n"])
def test_invalid_yaml(tmp_path, text):
    message = config_error(tmp_path, text)
    assert "YAML" in message


def test_top_level_must_be_a_mapping(tmp_path):
    config_error(tmp_path, "- just\n- a list\n")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(path)


def test_set_overrides_parse_values_as_yaml_and_create_nested_keys(tmp_path):
    data = with_section("pairing", limit=5)
    path = write_yaml(tmp_path, data)
    assert "filter" not in data  # the override has to create this section
    cfg = load_config(path, ["operator.batch_size=4", "filter.min_style=0.2", "pairing.limit=null"])
    assert cfg.operator.batch_size == 4
    assert cfg.filter.min_style == pytest.approx(0.2)
    assert cfg.pairing.limit is None


def test_apply_overrides_value_types():
    data = apply_overrides(
        {"a": {"b": 1}},
        ["a.b=4", "a.c=0.25", "a.d=null", "a.e=true", "a.f=[1, 2]", "a.g=hello", "x.y.z=7", "a.h="],
    )
    assert data["a"]["b"] == 4 and isinstance(data["a"]["b"], int)
    assert data["a"]["c"] == 0.25
    assert data["a"]["d"] is None
    assert data["a"]["e"] is True
    assert data["a"]["f"] == [1, 2]
    assert data["a"]["g"] == "hello"
    assert data["x"] == {"y": {"z": 7}}
    assert data["a"]["h"] == ""


def test_override_value_may_contain_equals_sign():
    data = apply_overrides({}, ["ray.address=ray://head:10001?x=1"])
    assert data["ray"]["address"] == "ray://head:10001?x=1"


@pytest.mark.parametrize(
    "override", ["operator.batch_size", "operator..batch_size=3", "=3", "operator.batch_size=[1", "output.path.x=1"]
)
def test_malformed_override_is_a_config_error(tmp_path, override):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, MINIMAL), [override])
    assert "\n" not in str(info.value)


def test_override_of_unknown_key_is_caught_by_validation(tmp_path):
    path = write_yaml(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"operator\.batchsize"):
        load_config(path, ["operator.batchsize=4"])


def test_operator_hash_tracks_what_changes_the_image():
    base = validate_config(with_section("operator", name="color-transfer", params={"strength": 0.5}))
    same = validate_config(with_section("operator", name="color-transfer", params={"strength": 0.5}))
    assert base.operator_hash() == same.operator_hash()
    assert len(base.operator_hash()) == 16
    int(base.operator_hash(), 16)

    changed_params = validate_config(with_section("operator", name="color-transfer", params={"strength": 0.6}))
    changed_model = validate_config(with_section("operator", name="color-transfer", model="tiny:sd15",
                                                 params={"strength": 0.5}))
    changed_name = validate_config(with_section("operator", name="sissi", params={}))
    changed_decode = validate_config(dict(with_section("operator", name="color-transfer",
                                                       params={"strength": 0.5}), decode={"max_side": 64}))
    for other in (changed_params, changed_model, changed_name, changed_decode):
        assert other.operator_hash() != base.operator_hash()

    # Where the output goes, how it is scheduled and how it is scored do not change an image.
    data = with_section("operator", name="color-transfer", params={"strength": 0.5}, batch_size=8, actors=[1, 3])
    data["output"] = {"path": "s3://elsewhere/run", "samples_per_shard": 7}
    data["scoring"] = {"batch_size": 2}
    data["filter"] = {"min_style": 0.3}
    assert validate_config(data).operator_hash() == base.operator_hash()


@pytest.mark.parametrize("section", ["operator", "scoring"])
def test_a_gpu_pool_holds_a_quarter_cpu_unless_num_cpus_is_set(section):
    """A GPU actor mostly waits on its device: a whole CPU each can leave none for decode and write tasks."""
    cpu = validate_config(with_section(section))
    gpu = validate_config(with_section(section, num_gpus=1))
    both = validate_config(with_section(section, num_gpus=0.5, num_cpus=2.0))
    cpu_set = validate_config(with_section(section, num_cpus=3.0))
    assert getattr(cpu, section).num_cpus == 1 and getattr(cpu_set, section).num_cpus == 3
    assert getattr(gpu, section).num_cpus == 0.25
    assert getattr(both, section).num_cpus == 2
    # Read back from run.json (num_cpus recorded), the value stays; the default never moves a key.
    again = validate_config(gpu.model_dump(mode="json"))
    assert getattr(again, section).num_cpus == 0.25
    assert len({c.operator_hash() for c in (cpu, gpu, both, cpu_set, again)}) == 1


def test_ray_stall_timeout_defaults_to_10_minutes_and_0_turns_it_off():
    assert validate_config(MINIMAL).ray.stall_timeout_s == 600
    assert validate_config(with_section("ray", stall_timeout_s=0)).ray.stall_timeout_s == 0
    with pytest.raises(ConfigError, match="ray.stall_timeout_s"):
        validate_config(with_section("ray", stall_timeout_s=-1))


def test_operator_hash_ignores_param_order():
    a = validate_config(with_section("operator", name="sissi", params={"steps": 4, "guidance": 3.0}))
    b = validate_config(with_section("operator", name="sissi", params={"guidance": 3.0, "steps": 4}))
    assert a.operator_hash() == b.operator_hash()
