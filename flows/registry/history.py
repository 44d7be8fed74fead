"""The registry read back: every registered version with its gate decision and promotion, and
the chain of champions that led to the one now (``forgetless history`` and ``status``).

Release, gate, promotion and audit tags come from the model version; strategy, new-task score
and retention from the MLflow run that registered it (absent for a version made without one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flows.core.config import ModelStore
from flows.registry.tracking import BASE, champion_version, client


@dataclass(frozen=True)
class VersionRow:
    """One registered version as ``forgetless history`` shows it."""

    version: str
    release: str
    strategy: str
    gate: str
    gate_reasons: str
    new_task_score: float | None
    min_retention: float | None  # the gated statistic vs the champion, lowest over tasks
    min_vs_anchor: float | None  # the same vs each task's anchor (base, or who learned it)
    promoted: bool  # has held the champion alias at some time
    promotion: str  # the ``promotion`` tag: when it was promoted, or why not
    champion: bool  # holds the alias now
    notes: list[str] = field(default_factory=list)  # forced promotion, rollback, demotion


@dataclass(frozen=True)
class LineageEntry:
    """One champion in the chain back to the base; ``version`` is "base" for the last one."""

    version: str
    release: str
    strategy: str
    how: str


def short_times(text: str) -> str:
    """ISO UTC timestamps in ``text`` cut to the minute: ``2025-01-02 03:04Z``."""
    return re.sub(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d):\d\d(?:\.\d+)?\+00:00", r"\1 \2Z", text or "")


def all_versions(c, name: str) -> list:
    """Every version of registered model ``name``, oldest first."""
    versions, token = [], None
    while True:
        page = c.search_model_versions(f"name = '{name}'", page_token=token)
        versions += list(page)
        token = page.token
        if not token:
            break
    return sorted(versions, key=lambda mv: int(mv.version))


def _run(c, run_id: str | None) -> tuple[dict, dict]:
    """The tags and metrics of the run that registered a version ({} when there is none)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}, {}
    try:
        data = c.get_run(run_id).data
    except MlflowException:
        return {}, {}
    return dict(data.tags), dict(data.metrics)


def notes(tags: dict[str, str]) -> list[str]:
    """The manual actions recorded on a version, oldest first, as short sentences (the last of
    each kind: a later action of the same kind overwrites its tags)."""
    out = []
    if "forced_promotion.at" in tags:
        at = tags["forced_promotion.at"]
        by, why = tags.get("forced_promotion.by", "?"), tags.get("forced_promotion.reason", "")
        out.append((at, f"forced promotion by {by} at {at}: {why}"))
    if "rollback.at" in tags:
        at = tags["rollback.at"]
        by, why = tags.get("rollback.by", "?"), tags.get("rollback.reason", "")
        source = tags.get("rollback.from", "?")
        out.append((at, f"champion again by rollback from v{source} by {by} at {at}: {why}"))
    if "demoted.at" in tags:
        at = tags["demoted.at"]
        by, why = tags.get("demoted.by", "?"), tags.get("demoted.reason", "")
        to = tags.get("demoted.to", "?")
        to = "the base model" if to == BASE else f"v{to}"
        via = tags.get("demoted.via", "?")
        out.append((at, f"demoted to {to} ({via}) by {by} at {at}: {why}"))
    return [short_times(text) for _, text in sorted(out)]


def how_champion(tags: dict[str, str]) -> str:
    """How a version last became champion: by the gate, a forced promotion or a rollback."""
    events = []
    promotion = tags.get("promotion", "")
    if promotion.startswith("promoted ") and "(forced" not in promotion:
        events.append((promotion.split()[1], "promoted by the gate"))
    if "forced_promotion.at" in tags:
        events.append(
            (
                tags["forced_promotion.at"],
                f"forced by {tags.get('forced_promotion.by', '?')}: "
                f"{tags.get('forced_promotion.reason', '')}",
            )
        )
    if "rollback.at" in tags:
        events.append(
            (
                tags["rollback.at"],
                f"rollback from v{tags.get('rollback.from', '?')} by "
                f"{tags.get('rollback.by', '?')}: {tags.get('rollback.reason', '')}",
            )
        )
    if not events:
        return "unknown"
    at, label = max(events)
    return short_times(f"{label} ({at})")


def history(store: ModelStore) -> list[VersionRow]:
    """One row per registered version, oldest first."""
    c = client(store)
    champion = champion_version(store)
    rows = []
    for mv in all_versions(c, store.model_name):
        tags = dict(mv.tags)
        run_tags, metrics = _run(c, mv.run_id)
        rows.append(
            VersionRow(
                version=str(mv.version),
                release=tags.get("release") or run_tags.get("release", ""),
                strategy=run_tags.get("strategy", ""),
                gate=tags.get("gate", "") or run_tags.get("gate", ""),
                gate_reasons=tags.get("gate_reasons", ""),
                new_task_score=metrics.get("new_task_score"),
                min_retention=metrics.get("min_kept", metrics.get("min_retention")),
                min_vs_anchor=metrics.get("min_kept_vs_anchor"),
                promoted="previous_champion" in tags,
                promotion=short_times(tags.get("promotion", "")),
                champion=str(mv.version) == champion,
                notes=notes(tags),
            )
        )
    return rows


def lineage(store: ModelStore) -> list[LineageEntry]:
    """The champion now and the champions before it, newest first, ending with the base model
    (or with the reason the chain stops: a version without ``previous_champion``, or gone)."""
    from mlflow.exceptions import MlflowException

    c = client(store)
    name = store.model_name
    entries: list[LineageEntry] = []
    seen: set[str] = set()
    version = champion_version(store)
    while version and version != BASE:
        if version in seen:
            entries.append(LineageEntry(version, "", "", "seen above: the chain loops"))
            return entries
        seen.add(version)
        try:
            mv = c.get_model_version(name, version)
        except MlflowException:
            entries.append(LineageEntry(version, "", "", "no such version (deleted)"))
            return entries
        run_tags, _ = _run(c, mv.run_id)
        entries.append(
            LineageEntry(
                version,
                mv.tags.get("release", ""),
                run_tags.get("strategy", ""),
                how_champion(dict(mv.tags)),
            )
        )
        version = mv.tags.get("previous_champion")
        if not version:
            entries.append(LineageEntry("?", "", "", "no previous_champion tag: chain unknown"))
            return entries
    entries.append(LineageEntry(BASE, "", "", f"the base model ({store.base_model})"))
    return entries
