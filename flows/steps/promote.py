"""Step 8, promote: move the ``champion`` alias to the new version, only on a gate pass, and
only if the champion is still the one this retrain was measured against.

Every move of the alias takes the promotion lock (``flows/registry/locks.py``, ``tracking.promote_lock``)
and reads the champion again inside it: of two retrains racing from the same champion at most
one is promoted, and the other is told the champion changed. MLflow aliases have no
compare-and-set, so with a remote tracking server this holds only if every writer of the alias
takes the same lock: on one machine the file lock does; across machines only the Prefect global
concurrency limit does (``auto`` picks it when ``PREFECT_API_URL`` names a shared server). Two
machines with file locks, or one without the Prefect API, can both read the old champion and
both move the alias (the last write stands). A holder paused for longer than the Prefect lease
(60 s, renewed while it runs) loses the lock; the read-then-write inside it takes a second.

Two manual actions share that lock: ``rollback`` (back along the chain of champions) and
``force_promote`` (an audited override of the gate). Both record who, when and why as tags.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from flows.core.config import ModelStore
from flows.core.records import GateDecision, Promotion, Registration
from flows.registry.locks import promotion_lock
from flows.registry.tracking import (
    BASE,
    CHAMPION,
    PENDING,
    WEIGHTS_REMOVED_TAG,
    WEIGHTS_TAG,
    champion_version,
    client,
    tracking_errors,
)


def promote(
    store: ModelStore,
    registration: Registration,
    decision: GateDecision,
    champion_at_start: str | None,
) -> Promotion:
    """Replace the version's ``promotion=pending`` tag with the decision, moving the alias on a
    pass. Safe to repeat: a version that is champion already (a retry after the alias moved) is
    reported promoted, and its missing tags are completed."""
    c = client(store)
    name, version = registration.name, registration.version
    with tracking_errors(
        store,
        f"promoting {name} v{version}",
        f"{name} v{version} keeps promotion=pending unless the alias moved",
    ):
        return _promote(c, store, name, version, decision, champion_at_start)


def _promote(
    c, store: ModelStore, name: str, version: str, decision: GateDecision, champion_at_start
) -> Promotion:
    if not decision.passed:
        reason = "gate failed: " + "; ".join(decision.reasons)
        c.set_model_version_tag(name, version, "promotion", "not promoted (gate failed)")
        return Promotion(promoted=False, champion_version=champion_version(store), reason=reason)
    with promotion_lock(store):
        current = champion_version(store)
        if current == version:  # this step ran before, and stopped after moving the alias
            tags = c.get_model_version(name, version).tags
            if tags.get("promotion", PENDING) == PENDING:
                c.set_model_version_tag(
                    name, version, "promotion", f"promoted {datetime.now(UTC).isoformat()}"
                )
            if "previous_champion" not in tags:
                c.set_model_version_tag(
                    name, version, "previous_champion", champion_at_start or "base"
                )
            return Promotion(
                promoted=True, champion_version=version, reason="gate passed; champion moved"
            )
        if current != champion_at_start:
            reason = (
                f"champion changed from {champion_at_start or 'base'} to {current} while this "
                "retrain ran; its retention was measured against the old champion"
            )
            c.set_model_version_tag(name, version, "promotion", f"not promoted ({reason})")
            return Promotion(promoted=False, champion_version=current, reason=reason)
        if c.get_model_version(name, version).tags.get("gate") != "passed":
            raise RuntimeError(f"{name} v{version} is not tagged gate=passed; refusing to promote")
        c.set_registered_model_alias(name, CHAMPION, version)
        c.set_model_version_tag(
            name, version, "promotion", f"promoted {datetime.now(UTC).isoformat()}"
        )
        c.set_model_version_tag(name, version, "previous_champion", current or BASE)
    return Promotion(promoted=True, champion_version=version, reason="gate passed; champion moved")


# Manual registry actions: rollback and forced promotion. Both are audited (who, when, why, as
# tags), serialised with retrain promotions by the same lock, and decide from the champion read
# inside it. Every check comes before the first write: a refused action changes nothing.
#
# The chain of champions is kept in ``previous_champion``: every version that has ever held the
# alias carries it (the champion it replaced, or "base"). A rollback follows that chain and never
# rewrites it, so rolling back twice goes two steps back, never forward again.


class RegistryActionError(ValueError):
    """A rollback or forced promotion was refused; the registry is unchanged."""


@dataclass(frozen=True)
class AliasMove:
    """What a manual action did: the champion before and after (None: the base model)."""

    name: str
    from_version: str | None
    to_version: str | None
    by: str
    at: str
    reason: str


def actor() -> str:
    """Who is acting: ``FORGETLESS_USER``, else the OS user."""
    who = os.environ.get("FORGETLESS_USER", "").strip()
    if who:
        return who
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return "unknown"


def _reason(reason: str | None) -> str:
    text = " ".join((reason or "").split())
    if not text:
        raise RegistryActionError("a reason is required: pass --reason TEXT (a short one will do)")
    return text


def _version_arg(version: str) -> str:
    text = str(version).strip()
    if not text.isdigit() or int(text) < 1:
        raise RegistryActionError(f"VERSION must be a registered version number, got {version!r}")
    return str(int(text))


def _get_version(c, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise RegistryActionError(f"{name} has no version {version}") from None
        raise


def champion_chain(c, name: str, version: str | None) -> list[str]:
    """``version`` and the champions before it, newest first, following ``previous_champion``
    (stops at the base, a missing tag or version, or a repeat)."""
    from mlflow.exceptions import MlflowException

    chain: list[str] = []
    while version and version != BASE and version not in chain:
        chain.append(version)
        try:
            version = c.get_model_version(name, version).tags.get("previous_champion")
        except MlflowException:
            break
    return chain


def rollback(store: ModelStore, version: str | None, reason: str | None) -> AliasMove:
    """Move the champion back: to the current champion's ``previous_champion`` when ``version``
    is None, else to ``version`` (a number, or "base"), which must have held the alias before or
    passed the gate. Back to the base the alias is removed. Audit tags go on both versions."""
    why = _reason(reason)
    target_arg = None if version is None else str(version).strip()
    if target_arg is not None and target_arg != BASE:
        target_arg = _version_arg(target_arg)
    c = client(store)
    name = store.model_name
    with promotion_lock(store):
        current = champion_version(store)
        if current is None:
            raise RegistryActionError(
                f"no champion to roll back: {name} has no {CHAMPION} alias, the base model "
                "already stands in"
            )
        current_mv = _get_version(c, name, current)
        if target_arg is None:
            target = current_mv.tags.get("previous_champion")
            if not target:
                raise RegistryActionError(
                    f"{name} v{current} has no previous_champion tag; name the version to "
                    "roll back to: forgetless rollback VERSION --reason TEXT"
                )
        else:
            target = target_arg
        if target == current:
            raise RegistryActionError(f"{name} v{current} is already the champion")
        target_mv = None
        if target != BASE:
            target_mv = _get_version(c, name, target)
            tags = target_mv.tags
            if "previous_champion" not in tags and tags.get("gate") != "passed":
                raise RegistryActionError(
                    f"{name} v{target} was never champion and did not pass the gate "
                    f"(gate={tags.get('gate', 'unknown')}); to override, use: forgetless "
                    f"promote {target} --force --reason TEXT"
                )
        who, at = actor(), datetime.now(UTC).isoformat()
        if target_mv is None:
            c.delete_registered_model_alias(name, CHAMPION)
        else:
            c.set_registered_model_alias(name, CHAMPION, target)
            if "previous_champion" not in target_mv.tags:  # first time champion: join the chain
                c.set_model_version_tag(name, target, "previous_champion", current)
            _tag(c, name, target, "rollback", by=who, at=at, reason=why, **{"from": current})
        _tag(c, name, current, "demoted", by=who, at=at, reason=why, to=target, via="rollback")
    return AliasMove(name, current, None if target == BASE else target, who, at, why)


def force_promote(store: ModelStore, version: str, force: bool, reason: str | None) -> AliasMove:
    """Promote ``version`` whatever its gate said: an audited override, refused without
    ``force`` and a reason. A version already in the champion's chain is reached with
    ``rollback`` instead, which keeps the chain as it is."""
    if not force:
        raise RegistryActionError(
            "promote outside a retrain is an override of the gate: pass --force and --reason TEXT"
        )
    why = _reason(reason)
    target = _version_arg(version)
    c = client(store)
    name = store.model_name
    with promotion_lock(store):
        current = champion_version(store)
        target_mv = _get_version(c, name, target)
        if target == current:
            raise RegistryActionError(f"{name} v{target} is already the champion")
        if target_mv.tags.get(WEIGHTS_TAG) == "removed":  # flows/registry/prune.py
            raise RegistryActionError(target_mv.tags.get(WEIGHTS_REMOVED_TAG, "weights removed"))
        if target in champion_chain(c, name, current):
            raise RegistryActionError(
                f"{name} v{target} was champion before v{current}; go back to it with: "
                f"forgetless rollback {target} --reason TEXT"
            )
        who, at = actor(), datetime.now(UTC).isoformat()
        c.set_registered_model_alias(name, CHAMPION, target)
        gate = target_mv.tags.get("gate", "unknown")
        c.set_model_version_tag(
            name, target, "promotion", f"promoted {at} (forced by {who}; gate {gate})"
        )
        c.set_model_version_tag(name, target, "previous_champion", current or BASE)
        _tag(c, name, target, "forced_promotion", by=who, at=at, reason=why)
        if current is not None:
            _tag(c, name, current, "demoted", by=who, at=at, reason=why, to=target, via="promote")
    return AliasMove(name, current, target, who, at, why)


def _tag(c, name: str, version: str, prefix: str, **values: str) -> None:
    for key, value in values.items():
        c.set_model_version_tag(name, version, f"{prefix}.{key}", value)
