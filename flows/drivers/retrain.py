"""The Prefect flow of one retrain: version → validate → probes → fine-tune → evaluate → gate
→ register → promote. Each task wraps the plain step function of the module named after it.

Run it with ``forgetless run`` (no server needed: Prefect starts a temporary one) or deploy it
to a Prefect server with a schedule (``infra/prefect.yaml``); with ``deploy.finetune_remote`` the
fine-tune step runs as its own flow run on the GPU work pool (``flows/production/remote_finetune.py``).

When a service fails: a Prefect API set in ``PREFECT_API_URL`` is waited for before the flow
starts (``check_prefect_api``: after 2, 4 and 8 s), and Prefect's client retries its own calls
once connected; the version, register and promote tasks are retried twice more (after 5 and
10 s) on an I/O error, an unreachable DVC remote or tracking server, on top of the retries
inside each step (``flows/registry/tracking.py``, ``flows/steps/version.py``). The run folder keeps the params
and a record per finished step: ``forgetless resume RUN_DIR`` finishes it later.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from prefect import Flow, get_run_logger, task
from prefect.tasks import exponential_backoff

from flows.core.config import Params, load_params, save_params
from flows.core.records import (
    FILES,
    ChampionRef,
    EvalReport,
    GateDecision,
    ProbeSet,
    Promotion,
    Record,
    Registration,
)
from flows.core.workspace import quiet_env
from flows.demo import build
from flows.production import landing
from flows.production.landing import LandedRelease, LandingPick, NoNewRelease
from flows.production.launch import RankFailedError
from flows.production.remote_finetune import (
    RemoteFinetuneFailed,
    evaluate_where_trained,
    train_candidate,
)
from flows.registry import tracking
from flows.registry.tracking import TrackingUnavailable, current_champion
from flows.steps.finetune import check_champion_kind
from flows.steps.gate import gate
from flows.steps.probes import ProbesStep, create_probe_set
from flows.steps.promote import promote
from flows.steps.register import RegisterStep, log_candidates, register
from flows.steps.report import ReportStep, publish
from flows.steps.tournament import (
    Candidate,
    CandidateResult,
    candidate_dir,
    choose,
    expand_candidates,
    interpolate,
    judge,
    merge_coefficient,
    merge_groups,
    summary_rows,
)
from flows.steps.validate import ValidateStep, ValidationFailed, validate_step
from flows.steps.version import version_release


class RetrainSummary(Record):
    release: str
    run_dir: Path
    strategy: str
    champion_at_start: str | None
    eval: EvalReport
    gate: GateDecision
    registration: Registration
    promotion: Promotion
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    step_seconds: dict[str, float]

    @property
    def overhead_share(self) -> float:
        """Share of the wall time outside training and evaluation (orchestration, tracking,
        versioning, validation, model loading and saving)."""
        return 1 - (self.train_seconds + self.eval_seconds) / self.wall_seconds


def next_demo_release(params: Params, champion: ChampionRef) -> Path:
    """The first embedded demo release the champion has not learned yet."""
    demo = build.build_demo(params.path(params.data.demo_dir))
    for release in build.demo_releases(demo):
        if release.name not in champion.releases:
            return release
    raise SystemExit(
        "the champion has learned every embedded demo release; pass --release DIR to train on "
        "your own data (or delete the workspace folder to start the demo over)"
    )


def transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (a busy tracking server, a locked file), never bad input or bugs."""
    try:
        state.result()
    except (OSError, TimeoutError, TrackingUnavailable):
        return True
    except Exception:
        return False
    return False


io = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=5),  # 5 s, then 10 s
    "retry_condition_fn": transient,
}
version_task = task(version_release, name="version", **io)
champion_task = task(current_champion, name="champion", **io)
validate_task = task(validate_step, name="validate")
probes_task = task(create_probe_set, name="probes")


def crashed(task, task_run, state) -> bool:
    """Retry a fine-tune that crashed (a rank killed, the GPU pool's flow run lost, an I/O
    error): the retry resumes from the last checkpoint. Never bad input, a NaN loss or a bug."""
    try:
        state.result()
    except (RankFailedError, RemoteFinetuneFailed, OSError):
        return True
    except Exception:
        return False
    return False


# here, or on the GPU pool (flows/production/remote_finetune.py)
finetune_task = task(train_candidate, name="finetune", retries=1, retry_condition_fn=crashed)
evaluate_task = task(evaluate_where_trained, name="evaluate")  # or read from the GPU pool
gate_task = task(gate, name="gate")
register_task = task(register, name="register", **io)
promote_task = task(promote, name="promote", **io)  # a repeat is safe: flows/steps/promote.py
landing_task = task(landing.pick, name="landing", **io)

API_RETRY_DELAYS = (2.0, 4.0, 8.0)  # seconds before each further health check of the Prefect API


class PrefectUnavailable(RuntimeError):
    """The Prefect API in ``PREFECT_API_URL`` does not answer; the retrain did not start."""


def check_prefect_api() -> None:
    """Wait for the Prefect API the flow reports to (``PREFECT_API_URL``), trying again after each
    of ``API_RETRY_DELAYS``, then fail naming it (Prefect itself fails at once, before it has
    connected). Without a URL Prefect starts a temporary server: nothing to wait for."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    start = time.monotonic()
    for delay in (*API_RETRY_DELAYS, None):
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10):
                return
        except urllib.error.HTTPError as exc:  # it answers; auth or routing is Prefect's concern
            if exc.code < 500:
                return
            problem = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if delay is not None:
            time.sleep(delay)
    raise PrefectUnavailable(
        f"Prefect API {url} is unreachable ({problem}; {len(API_RETRY_DELAYS) + 1} attempts over "
        f"{time.monotonic() - start:.0f} s); the retrain did not start — start the server "
        "(`prefect server start`) or fix PREFECT_API_URL (unset, Prefect runs the flow with a "
        "temporary server), then run again"
    )


class RetrainFlow(Flow):
    """The retrain flow; called in this process, it first waits for the Prefect API."""

    def __call__(self, *args, **kwargs):
        check_prefect_api()
        return super().__call__(*args, **kwargs)


def candidate_params(params: Params, candidate: Candidate) -> Params:
    """The params a tournament candidate trains with: its strategy and options."""
    return params.with_overrides(
        {"train.strategy": candidate.strategy, "train.strategy_params": candidate.strategy_params}
    )


def run_tournament(
    params: Params, champion: ChampionRef, release_dir: Path, probe_set: ProbeSet, run_dir: Path
) -> list[CandidateResult]:
    """Train every candidate of ``train.candidates`` (``parallel_candidates`` trainings at a
    time; candidates alike but for ``wise.mix`` share one), score each on the dev parts only,
    and mark the winner (``flows/steps/tournament.py``)."""
    groups = merge_groups(expand_candidates(params.train))
    start = tracking.candidate_dir(params.model_store, champion.model_dir)
    results = []
    at_once = params.train.parallel_candidates
    for batch in (groups[i : i + at_once] for i in range(0, len(groups), at_once)):
        running = [
            (
                members,
                finetune_task.with_options(name=f"finetune[{shared.label}]").submit(
                    candidate_params(params, shared),
                    champion,
                    release_dir,
                    candidate_dir(run_dir, shared),
                ),
            )
            for shared, members in batch
        ]
        for members, future in running:
            trained = future.result()
            for i, c in enumerate(members):
                mix = merge_coefficient(c)
                model = trained
                if mix is not None and mix != 1.0:
                    out = candidate_dir(run_dir, c) / "candidate_model"
                    model = interpolate(start, trained, mix, out)
                if i:  # the one training is counted once
                    model = model.model_copy(update={"train_seconds": 0.0})
                dev = evaluate_task.with_options(name=f"evaluate-dev[{c.label}]")(
                    candidate_params(params, c),
                    model.model_dir,
                    probe_set,
                    release_dir,
                    run_dir,
                    "dev",
                    candidate_dir(run_dir, c) / "dev",
                )
                results.append(judge(c, model, dev, params.gate))
    results = choose(results)
    (run_dir / "tournament.json").write_text(
        json.dumps([r.model_dump(mode="json") for r in results], indent=1)
    )
    return results


@partial(RetrainFlow, name="forgetless-retrain", log_prints=True)
def retrain(
    params_file: str = "params.yaml",
    release: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> RetrainSummary | NoNewRelease:
    """Retrain on ``release``, else ``data.release``, else (with ``data.landing``) the oldest
    landed release not processed yet (:class:`NoNewRelease` when there is none: nothing is
    trained or registered), else the next embedded demo release."""
    quiet_env()
    start = time.perf_counter()
    log = get_run_logger()
    params = load_params(params_file, overrides)
    ws = params.workspace_dir
    steps: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        steps[name] = round(time.perf_counter() - t, 2)
        return result

    release = release or (str(params.path(params.data.release)) if params.data.release else None)
    landed: LandedRelease | None = None
    if release is None and params.data.landing:  # a scheduled run: the landing zone decides
        found: LandingPick = timed("landing", landing_task, params)
        if found.release is None or found.staged is None:
            done = landing.nothing_new(found)
            log.info(done.message)
            return done
        landed, release = found.release, str(found.staged)
    champion = timed("champion", champion_task, params.model_store)
    for spec in params.train.candidates or [params.train.strategy]:
        check_champion_kind(champion.model_dir, spec)  # before any work, not at the fine-tune
    release_dir = Path(release).resolve() if release else next_demo_release(params, champion)
    log.info(f"retrain on release {release_dir.name}, from champion {champion.version or 'base'}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run_dir = ws / "runs" / f"{release_dir.name}-{stamp}"

    with landing.rejections_recorded(params, landed, run_dir):
        versioned = timed(
            "version", version_task, release_dir, ws, params.dvc_remote, champion.releases
        )
        versioned.write(run_dir / FILES["version"])
        save_params(run_dir, params)
        log.info(
            f"versioned {versioned.name}: {versioned.dvc_hash} (commit {versioned.git_commit[:8]})"
        )

        report = timed(
            "validate", validate_task, ValidateStep.from_params(params), versioned.path, champion
        )
        report.write(run_dir / FILES["validate"])
        if not report.passed:
            raise ValidationFailed(report)
    log.info(f"validated {report.checked}")

    probe_set = timed(
        "probes", probes_task, ProbesStep.from_params(params), versioned.path, champion, run_dir
    )
    probe_set.write(run_dir / FILES["probes"])
    log.info(
        f"probe set: {probe_set.n_items} test + {probe_set.n_dev} dev items, baseline "
        f"{probe_set.baseline}, known items {probe_set.known}; champion answers: "
        f"{probe_set.baseline_cached} from the score cache, {probe_set.baseline_scored} scored"
    )
    if probe_set.too_small:
        log.warning(
            f"too small to decide: {probe_set.too_small} (known {probe_set.known}, needed "
            f"{probe_set.needed_known}; their sources hold too few items the champion knows); "
            f"gate.too_small: {params.gate.too_small}"
        )

    tournament: list[CandidateResult] = []
    if params.train.candidates:
        t = time.perf_counter()
        tournament = run_tournament(params, champion, versioned.path, probe_set, run_dir)
        steps["tournament"] = round(time.perf_counter() - t, 2)
        winner = next(r for r in tournament if r.winner)
        log.info(f"tournament winner: {winner.candidate.label} {winner.note}".strip())
        params, trained = candidate_params(params, winner.candidate), winner.trained
        save_params(run_dir, params)
    else:
        trained = timed(
            "finetune", finetune_task, params, champion, versioned.path, run_dir, probe_set
        )
    trained.write(run_dir / FILES["finetune"])
    if trained.resumed_from_step:
        log.info(f"fine-tune resumed from its checkpoint at step {trained.resumed_from_step}")
    evaluation = timed(
        "evaluate", evaluate_task, params, trained.model_dir, probe_set, versioned.path, run_dir
    )
    evaluation.write(run_dir / FILES["evaluate"])
    decision = timed("gate", gate_task, evaluation, params.gate)
    decision.write(run_dir / FILES["gate"])
    log.info(f"gate {'passed' if decision.passed else 'FAILED'}: {decision.reasons}")

    registration = timed(
        "register",
        register_task,
        RegisterStep.from_params(params),
        versioned,
        probe_set,
        trained,
        evaluation,
        decision,
        run_dir,
    )
    registration.write(run_dir / FILES["register"])
    if tournament:
        log_candidates(params.model_store, registration.run_id, tournament)
    promotion = timed(
        "promote", promote_task, params.model_store, registration, decision, champion.version
    )
    promotion.write(run_dir / FILES["promote"])
    publish(ReportStep.from_params(params), run_dir, summary_rows(tournament))
    summary = RetrainSummary(
        release=versioned.name,
        run_dir=run_dir,
        strategy=params.train.strategy,
        champion_at_start=champion.version,
        eval=evaluation,
        gate=decision,
        registration=registration,
        promotion=promotion,
        # with a tournament: every candidate's training and dev scoring
        train_seconds=sum(r.trained.train_seconds for r in tournament) or trained.train_seconds,
        eval_seconds=probe_set.baseline_seconds
        + evaluation.eval_seconds
        + sum(r.dev.eval_seconds for r in tournament),
        wall_seconds=time.perf_counter() - start,
        step_seconds=steps,
    )
    summary.write(run_dir / "summary.json")
    if params.data.landing:  # processed: a scheduled run does not train this content again
        landing.record_processed(
            params,
            versioned.path,
            decision.passed,
            registration.version,
            run_dir,
            landed,
        )
    return summary
