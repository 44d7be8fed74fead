"""``params.yaml`` read into typed config. Unknown keys and bad values are errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import cf_strategies


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    base: str = "embedded:smollm2-135m-instruct"
    cache_dir: Path = Path(".cache/models")
    registered_name: str = "forgetless-lm"
    use_chat_template: bool = True


class DataConfig(Section):
    release: Path | None = None
    demo_dir: Path = Path(".cache/demo-data")
    max_prompt_chars: int = Field(2000, gt=0)
    max_completion_chars: int = Field(500, gt=0)
    min_train_records: int = Field(8, ge=1)
    min_eval_records: int = Field(4, ge=1)


class ProbesConfig(Section):
    sources: list[Path] = []
    per_category: int = Field(40, ge=1)
    seed: int = 0


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainConfig(Section):
    strategy: str = "naive"
    strategy_params: dict[str, dict[str, Any]] = {}
    rehearsal_prompts: Path | None = None
    general_importance_prompts: int = Field(64, ge=0)
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(1e-3, gt=0)
    max_steps: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(192, ge=8)
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0
    logging_steps: int = Field(1, ge=1)

    @field_validator("strategy_params")
    @classmethod
    def _known_strategy(cls, v, info):
        cf_strategies.validate_spec(info.data.get("strategy", "naive"), v)
        return v

    @field_validator("strategy")
    @classmethod
    def _valid_spec(cls, v):
        cf_strategies.validate_spec(v)
        return v


class EvaluateConfig(Section):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(20, ge=1)
    new_task_max_new_tokens: int = Field(8, ge=1)


class GateConfig(Section):
    min_retention: float = Field(0.9, ge=0)
    min_retention_per_task: dict[str, float] = {}
    min_new_task_score: float = Field(0.5, ge=0)
    min_new_task_gain: float = 0.0
    beat_champion: bool = True


class TrackingConfig(Section):
    uri: str | None = None
    experiment: str = "forgetless"


class VersioningConfig(Section):
    remote: str = "dvc-remote"


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

    def path(self, p: Path | str) -> Path:
        """A configured path made absolute against the directory of params.yaml."""
        p = Path(p)
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def workspace_dir(self) -> Path:
        return self.path(self.workspace)

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.workspace_dir / 'mlflow.db'}"

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
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return Params.model_validate(data)


class ParamsError(ValueError):
    """params.yaml is unreadable or breaks a rule; the message names the file and the key."""


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    path = Path(path).resolve()
    if not path.exists():
        raise ParamsError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    raw["root"] = str(path.parent)
    try:
        params = Params.model_validate(raw)
        return params.with_overrides(overrides) if overrides else params
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            hint = ""
            if err["type"] == "extra_forbidden":
                section = _section_model(err["loc"][:-1])
                hint = f" (valid keys here: {', '.join(sorted(section.model_fields))})"
            lines.append(f"  {key}: {err['msg']}{hint}")
        raise ParamsError(f"{path}: invalid params\n" + "\n".join(lines)) from None


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not isinstance(field.annotation, type):
            break
        if issubclass(field.annotation, BaseModel):
            model = field.annotation
    return model
