"""The small typed records that cross pipeline steps (big things travel as paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

# The pipeline steps in order, and the record file each writes into a run folder.
STAGES = ["version", "validate", "probes", "finetune", "evaluate", "gate", "register", "promote"]
FILES = {
    "version": "versioned_release.json",
    "validate": "validation_report.json",
    "probes": "probe_set.json",
    "finetune": "train_result.json",
    "evaluate": "eval_report.json",
    "gate": "gate_report.json",
    "register": "registration.json",
    "promote": "promotion.json",
}
# The params a run trained with (after overrides and the tournament's choice), beside its records.
PARAMS_FILE = "params.json"


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def read(cls, path: Path):
        return cls.model_validate_json(Path(path).read_text())


class VersionedRelease(Record):
    """A data release tracked by DVC in the workspace (step 1)."""

    name: str
    path: Path  # the release folder inside the workspace
    dvc_hash: str  # content hash of the folder (DVC's md5 of the directory)
    git_commit: str  # workspace commit that records the .dvc file
    remote: str


class Violation(Record):
    """One broken rule: which file, which line (1-based) and record, which rule."""

    file: str
    line: int | None
    record_id: str | None
    rule: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        rec = f" (record {self.record_id!r})" if self.record_id else ""
        return f"{where}{rec}: {self.rule}" + (f" — {self.detail}" if self.detail else "")


class ValidationReport(Record):
    """Step 2: the result of every expectation on every file of a release."""

    release: str
    passed: bool
    violations: list[Violation] = []
    checked: dict[str, int] = {}  # file -> records checked


class ChampionRef(Record):
    """The champion when a retrain began: a registered version, or the base model."""

    version: str | None  # None: no champion yet, the base model stands in
    model_dir: Path
    releases: list[str] = []  # releases this model has learned, oldest first
    learned_by: dict[str, str] = {}  # release -> the registered version that learned it


class ScoringConditions(Record):
    """How a model was asked: the gate pairs only results scored under equal conditions (the
    prompt template and decoding are part of every item's cache key, flows/scoring/score_cache.py)."""

    dtype: str  # torch dtype the weights answered in
    device: str  # device kind: cpu, cuda, mps


class ProbeSet(Record):
    """Step 3: the frozen probe set, the champion's scores on it (the baseline retention is
    measured against) and each task's anchor's (the base model for general knowledge, the
    version that learned a release for its items). Split into dev (for selection) and test (for
    the gate) only when a tournament selects on dev; otherwise every item is test."""

    path: Path  # the test part: the only probes the gate reads
    dvc_hash: str  # of the test part
    n_items: int  # in the test part
    tasks: list[str]
    baseline: dict[str, float]  # task -> the champion's score on the test part
    known: dict[str, int] = {}  # task -> test items the champion answers right
    needed_known: dict[str, int] = {}  # task -> known items the gate's design asks for
    too_small: list[str] = []  # tasks with fewer known test items than needed
    new_task_baseline: float  # the champion's score on the new release's eval set
    champion: ChampionRef
    baseline_seconds: float = 0.0
    baseline_cached: int = 0  # champion answers read from the score cache
    baseline_scored: int = 0  # champion answers computed (not in the cache)
    dev_path: Path | None = None  # the dev part: for choosing strategies, never for the gate
    n_dev: int = 0
    champion_results: Path | None = None  # the champion's per-item results, both parts
    anchors: dict[str, str] = {}  # task -> its anchor: "base", or the version ("v3")
    anchor_results: Path | None = None  # per-item results of the anchors on the test part
    conditions: ScoringConditions | None = None  # how the champion and anchors were scored


class TrainResult(Record):
    """Step 4: the candidate model folder (merged weights, tokenizer, strategy state)."""

    model_dir: Path
    strategy: str
    steps: int
    train_seconds: float
    log_history: list[dict] = []
    resumed_from_step: int | None = None  # a retry resumed from this step's checkpoint
    weights_dtype: str = "float32"  # the dtype training computed in, which the weights keep


class TaskRetention(Record):
    """One probe task on the test probes: the paired results of a reference model (the
    champion, or the task's anchor) and the candidate, and the exact one-sided test the gate
    decides on (``flows/scoring/confidence.py``)."""

    against: str = "champion"  # the reference: champion, base, or the version ("v3")
    n: int  # test items
    known: int  # items the reference answers right
    lost: int  # known items the candidate answers wrong
    gained: int  # items only the candidate answers right
    reference_score: float
    candidate_score: float
    retention: float  # candidate score / reference score (gains count): for reading
    statistic: Literal["kept", "net"] = "kept"  # gated: share of known items kept, or the ratio
    value: float  # the gated statistic
    low: float  # its one-sided lower bound at 1 - alpha: the gate passes iff low >= threshold
    high: float  # its one-sided upper bound at 1 - alpha
    threshold: float
    method: str  # named in the report
    needed_known: int  # known items the gate's design asks for
    passes_reliably_at: float  # true retention that passes with probability gate.power
    too_small: bool  # fewer known items than needed_known


class EvalReport(Record):
    """Step 5: candidate scores, and retention against the champion and each task's anchor."""

    scores: dict[str, float]  # probe task -> candidate score
    baseline: dict[str, float]
    retention: dict[str, float]  # task -> candidate / baseline (gains count): for reading
    new_task: str
    new_task_score: float
    new_task_baseline: float
    eval_seconds: float
    alpha: float = 0.0  # level of the one-sided tests below (0: none computed)
    tasks: dict[str, TaskRetention] = {}  # vs the champion
    anchored: dict[str, TaskRetention] = {}  # vs each task's anchor
    new_task_n: int = 0
    new_task_interval: tuple[float, float] | None = None  # exact 1 - 2 alpha interval
    new_task_gain_interval: tuple[float, float] | None = None  # exact paired, vs champion
    conditions: ScoringConditions | None = None  # how both models were scored


class GateCheck(Record):
    name: str
    value: float
    threshold: float
    passed: bool
    interval: tuple[float, float] | None = None  # the value's confidence interval
    note: str = ""  # e.g. "interval straddles the threshold", "too small to decide"
    strict: bool = False  # the value must be above the threshold, not merely reach it
    on_lower_bound: bool = False  # decided by the interval's lower end (a retention test)

    @property
    def meets(self) -> bool:
        """Whether the decided number (the value, or the lower bound) is on the passing side."""
        x = self.interval[0] if self.on_lower_bound and self.interval else self.value
        return x > self.threshold if self.strict else x >= self.threshold

    def __str__(self) -> str:
        op = (">" if self.strict else ">=") if self.meets else ("<=" if self.strict else "<")
        verdict = "ok" if self.passed else "FAILED"
        note = f" ({self.note})" if self.note else ""
        if self.on_lower_bound and self.interval:
            head = f"{self.name} = {self.value:.3f}, lower bound {self.interval[0]:.3f}"
        else:
            ci = f" [{self.interval[0]:.3f}, {self.interval[1]:.3f}]" if self.interval else ""
            head = f"{self.name} = {self.value:.3f}{ci}"
        return f"{head} {op} {self.threshold:.3f}: {verdict}{note}"


class GateDecision(Record):
    """Step 6: the decision and every check behind it. A failed gate is data, not an error."""

    passed: bool
    checks: list[GateCheck]

    @property
    def reasons(self) -> list[str]:
        return [str(c) for c in self.checks if not c.passed] or ["every check passed"]


class Registration(Record):
    """Step 7: the registered model version and its MLflow run."""

    name: str
    version: str
    run_id: str


class Promotion(Record):
    """Step 8: whether the champion alias moved, and why (not)."""

    promoted: bool
    champion_version: str | None  # the champion after this step
    reason: str
