"""Every configuration: strict pydantic schemas of the YAML files of ``run`` and ``filter`` (docs/architecture.md §4).

Strict means an unknown key, a wrong type or an absurd number is an error that names the key and the
file, so a typo never silently falls back to a default on a cluster that costs money by the hour.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the CLI prints it as one line and exits 2."""


class _Strict(BaseModel):
    # strict: `true` is not a batch size and "4" is not a number; YAML and --set already give real types.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


def _actors(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError("must be [min, max]")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError("must be [min, max] with whole numbers")
    lo, hi = value
    if lo < 1 or hi < lo or hi > 4096:
        raise ValueError("must be [min, max] with 1 <= min <= max <= 4096")
    return lo, hi


class OutputConfig(_Strict):
    path: str
    samples_per_shard: int = Field(256, ge=1, le=1_000_000)
    image_format: Literal["png", "jpg", "jpeg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    include_inputs: bool = False
    # fsync each staged file before the rename: survives power loss, not just a killed process.
    fsync: bool = True
    # S3 writer lease: renewed every ttl/4 while the run lives; a lease not renewed for this long belongs to a
    # crashed run and is taken over (local outputs use a kernel lock, released when the holder dies).
    lease_ttl_s: float = Field(120.0, ge=2, le=86_400)


class ContentConfig(_Strict):
    prompts: str | None = None
    images: str | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> ContentConfig:
        if not self.prompts and not self.images:
            raise ValueError("content needs at least one of 'prompts' or 'images'")
        return self


class StyleConfig(_Strict):
    images: str


class PairingConfig(_Strict):
    styles_per_content: int = Field(1, ge=1, le=10_000)
    seeds_per_pair: int = Field(1, ge=1, le=10_000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    limit: int | None = Field(None, ge=0)


class DecodeConfig(_Strict):
    """Input decoding: the pixel limit guards against decompression bombs; max_side bounds work per sample;
    max_aspect refuses slivers (longer side / shorter side) that no operator can use."""

    max_side: int = Field(512, ge=8, le=16384)
    max_pixels: int = Field(64_000_000, ge=64, le=1_000_000_000)
    max_aspect: float = Field(20.0, ge=1, le=100_000)
    # bytes of one input file (or tar member), checked from its size before any byte is read; the read itself
    # stops at max_bytes + 1. 64 MiB is far above any photo or artwork a pipeline at 512 px can use.
    max_bytes: int = Field(64 * 2**20, ge=1024, le=2**40)


# Protocols a source may use when the config names none (``local`` is read as ``file``).
DEFAULT_PROTOCOLS = ("file", "s3")
PROTOCOL_ALIASES = {"local": "file", "s3a": "s3", "gcs": "gs"}
# Never allowed, even when named: process memory is no data source, and a chained URL (``zip://a::s3://b``) would
# open one protocol through another, past the allow-list.
NEVER_PROTOCOLS = ("memory",)
PROTOCOL_NAME = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")


class SourcesConfig(_Strict):
    """What the sources may reach (docs: README "Security").

    ``protocols``: the URL protocols any source or manifest entry may use (default local files and ``s3``; add
    ``http``/``https``/``gs`` ... explicitly). ``roots``: folders or ``s3://bucket/prefix`` that manifest entries
    may point into besides the manifest's own folder. The caps bound what a prompt list or manifest can cost the
    driver before it is parsed (per file)."""

    protocols: list[str] = Field(default_factory=lambda: list(DEFAULT_PROTOCOLS))
    roots: list[str] = Field(default_factory=list)
    max_manifest_bytes: int = Field(256 * 2**20, ge=1024, le=2**40)
    max_prompt_bytes: int = Field(64 * 2**20, ge=1024, le=2**40)
    max_prompt_lines: int = Field(1_000_000, ge=1, le=10**9)

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for name in value:
            name = PROTOCOL_ALIASES.get(name.lower(), name.lower())
            if not PROTOCOL_NAME.match(name):
                raise ValueError(f"{name!r} is not a protocol name (file, s3, gs, https, ...)")
            if name in NEVER_PROTOCOLS:
                raise ValueError(f"{name!r} is never a source protocol")
            if name not in out:
                out.append(name)
        if not out:
            raise ValueError("needs at least one protocol (file, s3, ...)")
        return out

    @field_validator("roots")
    @classmethod
    def _plain_roots(cls, value: list[str]) -> list[str]:
        for root in value:
            if not root or "::" in root:
                raise ValueError(f"{root!r} is not a folder or a bucket/prefix URL")
        return value


# num_cpus of a GPU pool's actor when the config does not set it: the actor mostly waits on its device, and a
# whole logical CPU per GPU actor can leave no CPU for the decode and write tasks (a run that never progresses).
# Ray gives an actor with under one CPU OMP_NUM_THREADS=1.
GPU_ACTOR_CPUS = 0.25


class _ActorPool(_Strict):
    """Resources of one Ray actor pool: per-actor GPUs and CPUs (Ray sets OMP_NUM_THREADS to num_cpus) and
    the pool size [min, max]. ``num_cpus`` unset is 1 for a CPU pool and :data:`GPU_ACTOR_CPUS` for a GPU pool."""

    num_gpus: float = Field(0, ge=0, le=64)
    num_cpus: float = Field(1, gt=0, le=256)
    actors: tuple[int, int] = (1, 1)

    _check_actors = field_validator("actors", mode="before")(_actors)

    @model_validator(mode="before")
    @classmethod
    def _gpu_actor_cpus(cls, data: Any) -> Any:
        """A GPU pool whose config leaves num_cpus out holds a fraction of a CPU per actor, not a whole one."""
        if not isinstance(data, dict) or "num_cpus" in data:
            return data
        gpus = data.get("num_gpus")
        if isinstance(gpus, (int, float)) and not isinstance(gpus, bool) and gpus > 0:
            return {**data, "num_cpus": GPU_ACTOR_CPUS}
        return data


class FailuresConfig(_Strict):
    """``operator.failures``: the circuit breaker of each stylize actor. When at least ``min_failures`` of its last
    ``window`` samples failed in the operator with one reason, and they are at least ``ratio`` of that window,
    the run stops with one line naming the reason instead of writing a failed row per sample (broken weights
    cost GPU hours, not samples). Samples whose input did not decode do not count; rows already written stay."""

    enabled: bool = True
    min_failures: int = Field(50, ge=1, le=1_000_000)
    window: int = Field(200, ge=1, le=1_000_000)
    ratio: float = Field(0.9, gt=0, le=1)

    @model_validator(mode="after")
    def _fits(self) -> FailuresConfig:
        if self.min_failures > self.window:
            raise ValueError(f"min_failures ({self.min_failures}) cannot exceed window ({self.window})")
        return self


class OperatorConfig(_ActorPool):
    name: str = "color-transfer"
    model: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(1, ge=1, le=4096)
    # How many times Ray may replace one stylize actor's process (a poisoned CUDA device, a crash, a lost node)
    # over the run before the run stops; -1: no bound (Ray Data's own default).
    max_restarts: int = Field(3, ge=-1, le=100_000)
    failures: FailuresConfig = Field(default_factory=FailuresConfig)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        """A registered name, or a plug-in path ``package.module:Factory`` (imported by :meth:`plugin_checked`)."""
        from operators import check_name

        check_name(value)
        return value

    @field_validator("params")
    @classmethod
    def _applicable(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Unknown or inapplicable params exit 2 at validation, not on every sample once actors start (a
        plug-in's are checked by :meth:`plugin_checked`, which imports it)."""
        from operators import check_params, is_plugin

        name = info.data.get("name")
        if name is not None and not is_plugin(name):
            check_params(name, value, info.data.get("model"))
        return value

    @field_validator("model")
    @classmethod
    def _loadable(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Refuse at start-up a model that can never load (``tiny:nope``, a missing directory); a plug-in's
        model is whatever its factory takes."""
        from operators import is_plugin
        from operators.models import OPERATOR_TINY_KINDS, check_model_spec

        if value is not None and not is_plugin(info.data.get("name")):
            check_model_spec(value, OPERATOR_TINY_KINDS.get(info.data.get("name", "")))
        return value

    def plugin_checked(self, runtime_env: dict[str, Any]) -> None:
        """Import a plug-in operator and run its optional ``check_params`` here, before any actor starts. A module
        that does not import here is an error, unless ``runtime_env`` ships code (``py_modules``,
        ``working_dir``): then only the actors, which get that code, can import it."""
        from operators import UnknownOperatorError, check_params, is_plugin

        if not is_plugin(self.name):
            return
        try:
            check_params(self.name, self.params, self.model)
        except UnknownOperatorError:
            if not (runtime_env.get("py_modules") or runtime_env.get("working_dir")):
                raise


HEAD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # it becomes the index column ``score_<name>``


class HeadConfig(_Strict):
    """A quality head on the CLIP image embedding: a safetensors file (with its JSON config) or ``tiny``."""

    weights: str
    # for ``tiny`` only (a file carries its own config): aesthetic | nsfw | linear; default from the head's name
    layout: Literal["aesthetic", "nsfw", "linear"] | None = None

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str) -> str:
        if value == "tiny":
            return value
        if not value.endswith(".safetensors"):
            raise ValueError(f"{value}: heads load from .safetensors (convert a .pth with "
                             "`stylegen models convert-head IN OUT.safetensors`)")
        if not os.path.isfile(os.path.expanduser(value)):
            raise ValueError(f"head weights file not found: {value}")
        return value


class ScoringConfig(_ActorPool):
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "none"
    batch_size: int = Field(32, ge=1, le=65536)
    # scores from the image embedding the CLIP pass already made: index column ``score_<name>``
    heads: dict[str, HeadConfig] = Field(default_factory=dict)

    @field_validator("heads")
    @classmethod
    def _head_names(cls, value: dict[str, HeadConfig]) -> dict[str, HeadConfig]:
        for name in value:
            if not HEAD_NAME.match(name):
                raise ValueError(f"head name {name!r} must be lowercase letters, digits and _ (it names the "
                                 "index column score_<name>)")
        return value

    def heads_dump(self) -> dict[str, dict[str, Any]]:
        return {name: head.model_dump() for name, head in self.heads.items()}

    @field_validator("clip_model")
    @classmethod
    def _clip_loadable(cls, value: str) -> str:
        """``tiny:<kind>`` must be ``tiny:clip`` and a local directory must exist; open_clip names are checked
        where the model loads (listing them here would import open_clip and torch)."""
        from operators.models import check_model_spec, looks_local

        if value.startswith("tiny:") or looks_local(value):
            check_model_spec(value, ("clip",))
        return value

    @field_validator("clip_pretrained")
    @classmethod
    def _weights_exist(cls, value: str) -> str:
        from operators.models import looks_local

        if looks_local(value) and not os.path.isfile(os.path.expanduser(value)):
            raise ValueError(f"weights file not found: {value}")
        return value


class ScoreThresholds(_Strict):
    """The ``filter:`` block of a run config (``stylegen run``): CLIP and head scores a generated sample must reach."""

    min_content: float | None = Field(None, ge=-1, le=1)
    min_style: float | None = Field(None, ge=-1, le=1)
    # per quality head (scoring.heads): a score below min_scores[name] or above max_scores[name] is rejected
    min_scores: dict[str, float] = Field(default_factory=dict)
    max_scores: dict[str, float] = Field(default_factory=dict)


def check_score_rules(heads: dict[str, Any], f: Any) -> None:
    """``filter.min_scores`` / ``max_scores`` may only name configured heads (a typo must not filter nothing)."""
    for which in ("min_scores", "max_scores"):
        for name in getattr(f, which):
            if name not in heads:
                known = ", ".join(sorted(heads)) or "none configured"
                raise ValueError(f"filter.{which}.{name}: no such head in scoring.heads ({known})")


class _ScoredJob(_Strict):
    """What a run config and a filter config share beyond their fields: ``filter.min_scores``/``max_scores`` may
    only name the heads ``scoring.heads`` configures."""

    @model_validator(mode="after")
    def _score_rules(self):
        check_score_rules(self.scoring.heads, self.filter)
        return self


class RayConfig(_Strict):
    address: str | None = None
    # Ray's own runtime_env (pip, uv, env_vars, py_executable, ...), merged into a submitted job's; see README
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    # Start work only when every pool has its minimum actors, so min actors spread over the cluster share
    # the work from the start; a cluster that cannot provide them fails the run after this many seconds.
    wait_for_actors_s: int = Field(600, ge=1, le=86_400)
    # Stop the run with one line saying what is missing when no operator batch moves for this long (Ray Data's
    # no-progress guard: a block taken from or queued at any stage); 0 waits forever. Model loading of the
    # minimum actors happens before the clock starts (wait_for_actors_s); one operator batch must finish
    # within it.
    stall_timeout_s: int = Field(600, ge=0, le=86_400)


class RunConfig(_ScoredJob):
    output: OutputConfig
    content: ContentConfig
    style: StyleConfig
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    operator: OperatorConfig = Field(default_factory=OperatorConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    filter: ScoreThresholds = Field(default_factory=ScoreThresholds)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _plugin_operator(self, info: ValidationInfo) -> RunConfig:
        """A plug-in operator is imported only from a config the user gave: a config read back from an output
        (``run.json``, validated with ``context={"untrusted": True}``) never makes stylegen import code."""
        if not (info.context or {}).get("untrusted"):
            self.operator.plugin_checked(self.ray.runtime_env)
        return self

    def operator_hash(self) -> str:
        """Hash of everything that changes an output image; part of every sample key."""
        blob = json.dumps(
            {"op": self.operator.name, "model": self.operator.model, "params": self.operator.params,
             # max_aspect and max_bytes only refuse inputs (like the filter thresholds), they never change an
             # image: keeping them out of the hash keeps the keys of existing outputs.
             "decode": self.decode.model_dump(exclude={"max_aspect", "max_bytes"})},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


class FilterInput(_Strict):
    shards: str


class FilterRules(_Strict):
    """The ``filter:`` block of a filter config (``stylegen filter``): what a sample of the corpus must pass."""
    min_clip: float | None = Field(None, ge=-1, le=1)
    top_fraction: float | None = Field(None, gt=0, le=1)
    dedup_threshold: float | None = Field(None, gt=0, le=1)
    # clustered: k-means (faiss) then the greedy rule within each cluster (SemDeDup); greedy: the exact rule
    # over the whole pool, O(n^2). See pipeline.filter.dedup.
    dedup_method: Literal["clustered", "greedy"] = "clustered"
    # byte-identical image payloads keep one sample (best CLIP score, ties by key); runs before the semantic dedup
    dedup_exact: bool = False
    min_side: int | None = Field(None, ge=1)
    max_aspect: float | None = Field(None, ge=1)
    min_caption_chars: int | None = Field(None, ge=0)
    max_caption_chars: int | None = Field(None, ge=1)
    # per quality head (scoring.heads), from the persisted image embeddings: outside the bounds is rejected
    min_scores: dict[str, float] = Field(default_factory=dict)
    max_scores: dict[str, float] = Field(default_factory=dict)


class EmbeddingsConfig(_Strict):
    path: str | None = None  # default OUTPUT/embeddings; point at another run's to re-filter without CLIP work


class FilterRunConfig(_ScoredJob):
    """A filter config (``stylegen filter``), as :class:`RunConfig` is a run config (``stylegen run``)."""
    kind: Literal["filter"] = "filter"
    input: FilterInput
    output: OutputConfig
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    filter: FilterRules = Field(default_factory=FilterRules)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)  # the protocols input.shards may use
    ray: RayConfig = Field(default_factory=RayConfig)

    def embeddings_path(self) -> str:
        return self.embeddings.path or f"{self.output.path.rstrip('/')}/embeddings"

    def filter_hash(self) -> str:
        rules = self.filter.model_dump()
        if rules["dedup_method"] == "greedy" or rules["dedup_threshold"] is None:
            del rules["dedup_method"]  # the rule of outputs made before the option existed: their hash stays
        if not rules["dedup_exact"]:
            del rules["dedup_exact"]
        for name in ("min_scores", "max_scores"):  # outputs made before heads existed keep their hash
            if not rules[name]:
                del rules[name]
        what = {"filter": rules, "input": self.input.shards,
                "clip": [self.scoring.clip_model, self.scoring.clip_pretrained]}
        if self.scoring.heads:
            what["heads"] = self.scoring.heads_dump()
        blob = json.dumps(what, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``1`` is an int, ``null`` is None)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {dotted}: value is not valid YAML ({exc.__class__.__name__})") from None
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def _format_error(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-after"))
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    return f"{where}: {msg}" if where else msg


def load_config(path: str | Path, overrides: list[str] | None = None,
                schema: type[BaseModel] | str | None = None):
    """Read, override and validate a YAML config; every problem becomes a one-line ConfigError.

    ``env:NAME`` reads the YAML text from the environment variable NAME (how cluster jobs get their config).
    ``schema`` defaults to RunConfig (``stylegen run``); ``stylegen filter`` passes its own; ``"auto"`` picks
    by the config's keys (``stylegen validate`` and ``submit``).
    """
    if str(path).startswith("env:"):
        name = str(path)[4:]
        text = os.environ.get(name)
        if text is None:
            raise ConfigError(f"{path}: environment variable {name} is not set")
        return _parse(text, str(path), overrides, schema)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__})") from None
    return _parse(text, str(path), overrides, schema)


def _parse(text: str, path: str, overrides: list[str] | None, schema: type[BaseModel] | str | None = None):
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return validate_config(data, source=str(path), schema=schema)


def config_schema(data: dict[str, Any]) -> type[BaseModel]:
    """The kind of a config from its keys: ``kind: filter`` or ``input`` without ``content`` is a filter config
    (``stylegen filter``), anything else a run config. ``kind: run`` is accepted and dropped."""
    if data.get("kind") == "run":
        del data["kind"]
        return RunConfig
    if data.get("kind") == "filter" or ("input" in data and "content" not in data):
        return FilterRunConfig
    return RunConfig


def validate_config(data: dict[str, Any], source: str = "<config>", schema: type[BaseModel] | str | None = None,
                    *, untrusted: bool = False):
    """Validate ``data`` against ``schema`` (default RunConfig; ``"auto"``: by :func:`config_schema`).
    ``untrusted``: the config was read from an output (``run.json``), so a plug-in operator it names is not
    imported."""
    if schema == "auto":
        schema = config_schema(data)
    try:
        return (schema or RunConfig).model_validate(data, context={"untrusted": untrusted})
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {first}{more}") from None
