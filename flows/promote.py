"""Step 8, promote: move the ``champion`` alias to the new version, only on a gate pass, and
only if the champion is still the one this retrain was measured against.

Promotions on one tracking store are serialised by a file lock beside it (the SQLite store, or
the workspace for a remote server); inside the lock the champion is read again, so of two
retrains racing from the same champion at most one is promoted and the other is told why.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock

from flows.config import Params
from flows.records import GateDecision, Promotion, Registration
from flows.tracking import CHAMPION, champion_version, client


def promotion_lock(params: Params) -> FileLock:
    uri = params.tracking_uri
    folder = (
        Path(uri.removeprefix("sqlite:///")).parent
        if uri.startswith("sqlite:///")
        else params.workspace_dir
    )
    return FileLock(str(folder / f".{params.model.registered_name}.promote.lock"), timeout=600)


def promote(
    params: Params,
    registration: Registration,
    decision: GateDecision,
    champion_at_start: str | None,
) -> Promotion:
    c = client(params)
    name, version = registration.name, registration.version
    if not decision.passed:
        reason = "gate failed: " + "; ".join(decision.reasons)
        c.set_model_version_tag(name, version, "promotion", "not promoted (gate failed)")
        return Promotion(promoted=False, champion_version=champion_version(params), reason=reason)
    with promotion_lock(params):
        current = champion_version(params)
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
        c.set_model_version_tag(name, version, "previous_champion", current or "base")
    return Promotion(promoted=True, champion_version=version, reason="gate passed; champion moved")
