"""``params.yaml`` read into typed config. Unknown keys and bad values are errors naming the key.

The file is read by :func:`flows.core.safe_yaml.load_yaml` (no duplicate keys, anchors, aliases or deep
nesting) from a regular file of at most 1 MB (:func:`flows.core.files.read_text`), then validated by
:class:`Params`: every section forbids unknown keys, every number is finite and bounded, and a
value has the type written in the file (a quoted ``'30'`` is a string, not the number 30; YAML
1.2 numbers such as ``1e-3`` are numbers). ``train.candidates`` may expand to at most
:data:`MAX_CANDIDATES` candidates, counted before any is built.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

import cf_strategies
from flows.core.files import DataError, read_text
from flows.core.records import PARAMS_FILE
from flows.core.safe_yaml import YamlError, cut, load_yaml
from flows.core.schemas import bad_character

EMBEDDED = "embedded:smollm2-135m-instruct"  # the model that ships with the project
MAX_CANDIDATES = 64  # train.candidates: fine-tunes one retrain may run
PARAMS_MAX_BYTES = 1_000_000


class Section(BaseModel):
    """A section of params.yaml: unknown keys are errors, numbers are finite, and YAML's
    ``true``/``false`` are booleans only (never the number 1 or 0, nor from 1 or "yes")."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _types_as_written(cls, value: Any, info: ValidationInfo) -> Any:
        kind = _plain(cls.model_fields[info.field_name].annotation)
        section = isinstance(kind, type) and issubclass(kind, BaseModel)  # checks its own keys
        if not section and (where := _control_character(value)) is not None:
            raise ValueError(f"contains a control character ({where}); paths and names cannot")
        if kind is bool and not isinstance(value, bool):
            raise ValueError("Input should be a valid boolean: true or false")
        values = [value]
        if get_origin(kind) is dict and isinstance(value, dict):
            kind, values = _plain(get_args(kind)[1]), list(value.values())
        if kind in (int, float) and any(isinstance(v, bool) for v in values):
            raise ValueError("Input should be a number, not true/false")
        if kind in (int, float) and any(isinstance(v, str) for v in values):
            word = "integer" if kind is int else "number"
            raise ValueError(f"Input should be a valid {word}, not a string (no quotes)")
        return value


def _control_character(value: Any) -> str | None:
    """Where a string in ``value`` (or in its lists and mappings) holds a character a name or a
    path may not hold (:func:`flows.core.schemas.bad_character` with the label rule)."""
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        return next((w for v in value if (w := _control_character(v)) is not None), None)
    return bad_character(value, label=True)


def _plain(annotation: Any) -> Any:
    """The type under ``Annotated[...]`` constraints."""
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


NonEmptyStr = Annotated[str, Field(min_length=1)]


class ModelConfig(Section):
    base: NonEmptyStr = EMBEDDED
    cache_dir: Path = Path(".cache/models")
    # a name MLflow accepts that is also safe in file names (the promotion lock): no path parts
    registered_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] = (
        "forgetless-lm"
    )
    use_chat_template: bool = True
    trust_remote_code: bool = False  # run Python code shipped with a model: only if trusted

    @field_validator("base")
    @classmethod
    def _known_embedded(cls, value: str) -> str:
        if value.startswith("embedded:") and value != EMBEDDED:
            raise ValueError(
                f"unknown embedded model {value!r}; the embedded model is {EMBEDDED} "
                "(or give a model folder or a hub id)"
            )
        return value


class DataConfig(Section):
    release: Path | None = None
    landing: NonEmptyStr | None = None  # folder or fsspec URL releases are submitted to
    demo_dir: Path = Path(".cache/demo-data")
    max_prompt_chars: int = Field(2000, gt=0)
    max_completion_chars: int = Field(500, gt=0)
    min_train_records: int = Field(8, ge=1)
    min_eval_records: int = Field(4, ge=1)
    # near-duplicate leaks: the share of rarity-weighted words kept exactly (flows/core/leaks.py)
    leak_threshold: float = Field(0.9, ge=0.5, le=1.0)


class ProbesConfig(Section):
    sources: list[Path] = []
    per_category: int = Field(40, ge=1)
    min_known: int | None = Field(
        None, ge=0
    )  # None: from the gate's design (flows/scoring/confidence.py)
    dev_fraction: float = Field(0.5, ge=0.0, lt=1.0)  # only when a tournament selects on dev
    seed: int = 0


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[NonEmptyStr] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )


def pipeline_strategy(spec: str) -> None:
    """A valid spec the pipeline can run. Parameter-isolation strategies (packnet, progressive)
    keep each release's parameters and are served by task; one of them at most, since each
    claims the model's task parameters for itself."""
    names = cf_strategies.validate_spec(spec)
    isolating = [n for n in names if cf_strategies.STRATEGIES[n].isolates_tasks]
    if len(isolating) > 1:
        raise ValueError(
            f"strategies {isolating} both keep parameters per task; combine at most one "
            "parameter-isolation strategy with others"
        )


def grid_size(options: dict[str, Any]) -> int:
    """How many combinations :func:`grid` would build, counted without building them."""
    return math.prod(len(v) if isinstance(v, list) else 1 for v in options.values())


def grid(spec: str, options: dict[str, Any]) -> list[dict[str, dict[str, Any]]]:
    """Every combination of the option grid as ``{strategy: {option: value}}``; a list is a
    grid axis, anything else a fixed value; in a combination, options are ``strategy.option``."""
    names = cf_strategies.split_spec(spec)
    axes = []
    for key, values in options.items():
        strategy, _, option = key.rpartition(".")
        if not strategy:
            if len(names) != 1:
                raise ValueError(
                    f"train.candidates[{spec!r}]: option {key!r} must name its strategy "
                    f"({' or '.join(f'{n}.{key}' for n in names)})"
                )
            strategy = names[0]
        if strategy not in names:
            raise ValueError(f"train.candidates[{spec!r}]: {key!r} is not an option of {spec!r}")
        axes.append(
            [(strategy, option, v) for v in (values if isinstance(values, list) else [values])]
        )
    combos = []
    for picks in itertools.product(*axes):
        chosen: dict[str, dict[str, Any]] = {}
        for strategy, option, value in picks:
            chosen.setdefault(strategy, {})[option] = value
        combos.append(chosen)
    return combos


def laid_over(
    strategy_params: dict[str, dict[str, Any]], chosen: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """A candidate's options (one combination of :func:`grid`) laid over
    ``train.strategy_params``: what the candidate trains with."""
    merged = {name: dict(options) for name, options in strategy_params.items()}
    for name, options in chosen.items():
        merged[name] = {**merged.get(name, {}), **options}
    return merged


class TrainConfig(Section):
    strategy: str = "naive"
    strategy_params: dict[str, dict[str, Any]] = {}
    rehearsal_prompts: Path | None = None
    general_importance_prompts: int = Field(64, ge=0)
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(1e-3, gt=0, le=1)
    max_steps: int = Field(30, ge=1, le=10_000_000)
    batch_size: int = Field(8, ge=1, le=65_536)
    max_length: int = Field(192, ge=8, le=1_048_576)
    warmup_steps: int = Field(0, ge=0, le=10_000_000)
    seed: int = 0
    logging_steps: int = Field(1, ge=1)
    checkpoint_steps: int = Field(10, ge=0)  # 0: no checkpoints (a crash starts over)
    candidates: dict[str, dict[str, Any]] = {}
    parallel_candidates: int = Field(1, ge=1)
    # processes the fine-tune step trains on (DDP; flows/production/launch.py): "auto" = one per GPU
    num_processes: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    fsdp: bool = False  # with several processes on GPUs: shard the model (FSDP) instead of DDP
    # one row per batch, no padding (DataCollatorWithFlattening); flattening-safe strategies only
    padding_free: bool = False

    @field_validator("num_processes", mode="before")
    @classmethod
    def _processes_not_boolean(cls, v):
        if isinstance(v, bool):
            raise ValueError('Input should be a number of processes or "auto", not true/false')
        return v

    @field_validator("strategy_params")
    @classmethod
    def _known_strategy(cls, v, info):
        cf_strategies.validate_spec(info.data.get("strategy", "naive"), v, strict=True)
        return v

    @field_validator("strategy")
    @classmethod
    def _valid_spec(cls, v):
        pipeline_strategy(v)
        return v

    @field_validator("candidates")
    @classmethod
    def _valid_candidates(cls, v, info):
        total = sum(grid_size(options or {}) for options in v.values())
        if total > MAX_CANDIDATES:
            raise ValueError(
                f"expands to {total} candidates, over the limit of {MAX_CANDIDATES} "
                "(each is a fine-tune): list fewer values"
            )
        for spec, options in v.items():
            pipeline_strategy(spec)
            for chosen in grid(spec, options or {}):
                merged = laid_over(info.data.get("strategy_params") or {}, chosen)
                cf_strategies.validate_spec(spec, merged, strict=True)
        return v


class EvaluateConfig(Section):
    batch_size: int = Field(64, ge=1)  # rows per forward pass (choices, or prompts generated)
    max_new_tokens: int = Field(20, ge=1)
    new_task_max_new_tokens: int | None = Field(None, ge=1)  # None: each item's own budget
    answer_margin_tokens: int = Field(8, ge=0)
    score_cache: bool = (
        True  # flows/scoring/score_cache.py: never score one item twice on one model
    )


class UncertainPolicy(Section):
    """What a new-task check decides when its interval straddles the threshold (retention is
    always decided by its exact test: ``flows/scoring/confidence.py``)."""

    new_task: Literal["fail", "point_estimate"] = "point_estimate"


Retention = Annotated[float, Field(ge=0, lt=1)]  # 1.0 could never be shown by a finite sample


class GateConfig(Section):
    min_retention: Retention = 0.9  # vs the champion: no step back
    min_retention_per_task: dict[str, Retention] = {}
    min_retention_vs_anchor: Retention = 0.85  # vs the anchor: drift over any number of releases
    min_new_task_score: float = Field(0.5, ge=0, le=1)
    min_new_task_gain: float = Field(0.0, ge=-1, le=1)  # a difference of two scores in [0, 1]
    beat_champion: bool = True
    alpha: float = Field(0.05, gt=0.0, lt=0.5)  # level of every one-sided retention test
    gains_offset_losses: bool = False  # gate the ratio of accuracies instead of the kept share
    power: float = Field(0.9, gt=0.0, lt=1.0)  # design: a good candidate passes this often
    design_retention: Retention = 0.96  # what "a good candidate" keeps (sets probes' min_known)
    too_small: Literal["fail", "decide"] = "fail"  # a task with fewer known items than needed
    too_small_releases: Literal["fail", "decide"] = "decide"  # the same, an earlier release's items
    when_uncertain: UncertainPolicy = UncertainPolicy()

    def threshold(self, task: str) -> float:
        return self.min_retention_per_task.get(task, self.min_retention)

    @model_validator(mode="after")
    def _design_above_thresholds(self) -> GateConfig:
        top = max([self.min_retention, *self.min_retention_per_task.values()])
        if self.design_retention <= top:
            raise ValueError(
                f"design_retention ({self.design_retention}) must be above every retention "
                f"threshold ({top}): a candidate at the threshold passes at most alpha of the time"
            )
        return self


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow cannot use ``uri`` as a tracking store, or None. A plain path or ``file:`` is
    MLflow's file store, which MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``."""
    scheme = uri.split(":", 1)[0] if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    if len(scheme) <= 1 or scheme.lower() == "file":  # a path (or a Windows drive letter)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true":
            return None
        return (
            f"{uri!r} is a file store, which MLflow 3 no longer accepts; use a database "
            "such as sqlite:///path/to/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)"
        )
    if scheme.split("+", 1)[0].lower() not in TRACKING_SCHEMES:
        return f"unknown tracking URI scheme {scheme!r}; use one of " + ", ".join(
            f"{s}:" for s in TRACKING_SCHEMES
        )
    return None


class TrackingConfig(Section):
    uri: NonEmptyStr | None = None
    experiment: NonEmptyStr = "forgetless"
    promote_lock: Literal["auto", "file", "prefect"] = "auto"  # flows/registry/locks.py

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        problem = value and tracking_uri_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class VersioningConfig(Section):
    remote: NonEmptyStr = "dvc-remote"


class RegistryConfig(Section):
    """How a candidate's weights are registered and kept (flows/steps/register.py, flows/registry/prune.py)."""

    weights: Literal["merged", "adapter"] = "merged"  # adapter: LoRA + a reference to its parent
    keep_failed_weights: int | None = Field(None, ge=0)  # None: never remove failed weights


class DeployConfig(Section):
    """Production: the Prefect work pools, and fine-tuning as its own flow run on the GPU pool."""

    cpu_pool: NonEmptyStr = "cpu"  # the retrain flow: version, validate, probes, gate, register...
    gpu_pool: NonEmptyStr = "gpu"  # the fine-tune flow
    finetune_remote: bool = False  # fine-tune with run_deployment on gpu_pool, not in-process
    evaluate_remote: bool = False  # the GPU flow run also scores the candidate (the test part)
    finetune_deployment: NonEmptyStr = "forgetless-finetune/finetune"  # flow/deployment
    handoff: str | None = None  # fsspec URL where the pools exchange files (s3://bucket/handoff/)
    timeout_minutes: float = Field(360, gt=0)  # longest wait for the fine-tune flow run

    @field_validator("handoff")
    @classmethod
    def _handoff_is_shared(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(
                "must be a URL both pools reach (s3://bucket/handoff/, gs://...), not a local "
                f"path ({value!r}): a path on one worker does not exist on the other"
            )
        return value

    @model_validator(mode="after")
    def _remote_needs_handoff(self) -> DeployConfig:
        if self.finetune_remote and not self.handoff:
            raise ValueError(
                "finetune_remote needs deploy.handoff: the URL where the pools exchange the "
                "release and the candidate (s3://bucket/handoff/)"
            )
        if self.evaluate_remote and not self.finetune_remote:
            raise ValueError(
                "evaluate_remote needs finetune_remote: the GPU evaluates what it trained"
            )
        return self


class ModelStore(BaseModel):
    """The model registry as the registry functions read it (``flows.registry``): the sections
    of ``params.yaml`` they use, with every path and URI resolved once (``Params.model_store``)."""

    model_config = ConfigDict(frozen=True)

    uri: str  # the MLflow tracking and registry URI (Params.tracking_uri)
    experiment: str  # tracking.experiment
    model_name: str  # model.registered_name
    workspace: Path  # remote weights are cached and the promotion file lock lives here
    promote_lock: Literal["auto", "file", "prefect"]  # tracking.promote_lock
    keep_failed_weights: int | None  # registry.keep_failed_weights
    base_model: str  # model.base: the champion before any promotion
    model_cache: Path  # model.cache_dir, where the embedded base model is converted


class Params(Section):
    """All of ``params.yaml``; relative paths are resolved against ``root``."""

    root: Path = Path(".")
    workspace: Path = Path("workspace")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    probes: ProbesConfig = ProbesConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    tracking: TrackingConfig = TrackingConfig()
    versioning: VersioningConfig = VersioningConfig()
    registry: RegistryConfig = RegistryConfig()
    deploy: DeployConfig = DeployConfig()

    @model_validator(mode="after")
    def _remote_evaluation_without_tournament(self) -> Params:
        if self.deploy.evaluate_remote and self.train.candidates:
            raise ValueError(
                "deploy.evaluate_remote with train.candidates: a tournament scores its "
                "candidates on the dev probes here; set deploy.evaluate_remote: false"
            )
        return self

    def path(self, p: Path | str) -> Path:
        """A configured path made absolute against the directory of params.yaml."""
        p = Path(p)
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def workspace_dir(self) -> Path:
        return self.path(self.workspace)

    @property
    def tracking_uri(self) -> str:
        """``tracking.uri``, else ``FORGETLESS_TRACKING_URI`` from the environment (where a
        deployed stack puts its endpoint), else the workspace's own SQLite store. Not
        ``MLFLOW_TRACKING_URI``: ``mlflow.set_tracking_uri`` rewrites that variable in the
        process, so it would carry one retrain's store into the next and into child processes."""
        return (
            self.tracking.uri
            or os.environ.get("FORGETLESS_TRACKING_URI")
            or f"sqlite:///{self.workspace_dir / 'mlflow.db'}"
        )

    @property
    def model_store(self) -> ModelStore:
        return ModelStore(
            uri=self.tracking_uri,
            experiment=self.tracking.experiment,
            model_name=self.model.registered_name,
            workspace=self.workspace_dir,
            promote_lock=self.tracking.promote_lock,
            keep_failed_weights=self.registry.keep_failed_weights,
            base_model=self.model.base,
            model_cache=self.path(self.model.cache_dir),
        )

    @property
    def dvc_remote(self) -> str:
        remote = self.versioning.remote
        return remote if "://" in remote else str(self.path(remote))

    def with_overrides(self, overrides: dict[str, Any]) -> Params:
        """A copy with dotted-key overrides applied, e.g. ``{"train.max_steps": 5}``."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for depth, key in enumerate(parents):
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    where = ".".join(parents[: depth + 1])
                    raise ParamsError(f"override {dotted!r}: {where} is a value, not a section")
            node[leaf] = value
        return Params.model_validate(data)


class ParamsError(ValueError):
    """params.yaml is unreadable or breaks a rule; the message names the file and the key."""


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    path = Path(path).resolve()
    try:
        raw = load_yaml(read_text(path, PARAMS_MAX_BYTES), PARAMS_MAX_BYTES) or {}
    except DataError as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise ParamsError(f"{where}: {exc.rule} (the params file)") from None
    except YamlError as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise ParamsError(f"{where}: {exc.rule}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    if "root" in raw:
        raise ParamsError(f"{path}: root: is set from the file's folder, not written")
    raw["root"] = str(path.parent)
    try:
        params = Params.model_validate(raw)
        params = params.with_overrides(overrides) if overrides else params
    except ValidationError as exc:
        raise ParamsError(f"{path}: invalid params\n" + validation_lines(exc)) from None
    folder_problems = [
        f"  {key}: {problem}"
        for key, folder in (
            ("workspace", params.workspace_dir),
            ("model.cache_dir", params.path(params.model.cache_dir)),
            ("data.demo_dir", params.path(params.data.demo_dir)),
        )
        if (problem := not_a_folder(folder))
    ]
    env_uri = os.environ.get("FORGETLESS_TRACKING_URI")
    if not params.tracking.uri and env_uri and (problem := tracking_uri_problem(env_uri)):
        folder_problems.append(f"  FORGETLESS_TRACKING_URI (environment): {problem}")
    if folder_problems:
        raise ParamsError(f"{path}: invalid params\n" + "\n".join(folder_problems))
    return params


def not_a_folder(folder: Path) -> str | None:
    """Why ``folder`` cannot be used as a folder (it may not exist yet), or None."""
    for part in (folder, *folder.parents):
        if part.exists() or part.is_symlink():
            if part.is_dir():
                return None
            what = "a file" if part.is_file() else "a device, pipe, socket or broken link"
            where = "" if part == folder else f", and it is on the path to {folder}"
            return f"{part} is {what}, not a folder{where}"
    return None


def validation_lines(exc: ValidationError) -> str:
    """One line per error: the dotted key, the rule, the valid keys where a key is unknown."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        hint = ""
        if err["type"] == "extra_forbidden":
            section = _section_model(err["loc"][:-1])
            valid = sorted(set(section.model_fields) - {"root"})  # root is set, not written
            hint = f" (valid keys here: {', '.join(valid)})"
        lines.append(f"  {cut(key)}: {cut(err['msg'], 300)}{hint}")
    return "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not isinstance(field.annotation, type):
            break
        if issubclass(field.annotation, BaseModel):
            model = field.annotation
    return model


def save_params(run_dir: Path, params: Params) -> Path:
    """Keep the params a run uses beside its records, for ``resume``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PARAMS_FILE
    path.write_text(params.model_dump_json(indent=1))
    return path


def run_params(run_dir: Path, params: Params) -> Params:
    """The params ``run_dir`` ran with (overrides and tournament choice included) when it kept
    them, else ``params``. Where the services are (``tracking``, ``versioning``) always comes
    from ``params``, so a run can finish against a server that moved."""
    path = run_dir / PARAMS_FILE
    if not path.exists():
        return params
    kept = Params.model_validate_json(path.read_text())
    return kept.model_copy(update={"tracking": params.tracking, "versioning": params.versioning})
