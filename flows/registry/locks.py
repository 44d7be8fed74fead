"""The promotion lock: what serialises every move of the ``champion`` alias (a retrain's
promotion, a rollback, a forced promotion) for one registered model.

``tracking.promote_lock`` chooses it:

- ``file``: a ``filelock.FileLock`` beside the SQLite store, or in the workspace for a tracking
  server. It serialises the processes of one machine only.
- ``prefect``: a Prefect global concurrency limit of 1 slot named ``forgetless-promote-<model>``
  on the Prefect server in ``PREFECT_API_URL``, shared by every machine that reports to it (the
  file lock is taken first as well, so a process of this machine without the Prefect API still
  waits). The limit is created on first use; one whose limit is not 1, or that is disabled, is
  refused rather than used.
- ``auto`` (the default): ``prefect`` when ``PREFECT_API_URL`` is set, else ``file``. Without
  that URL Prefect runs an ephemeral server inside each process, which serialises nothing.

The Prefect slot is held under a lease of ``LEASE_SECONDS``, renewed by Prefect's client every
three quarters of it. A holder that dies without releasing (killed, machine lost) keeps the slot
until the lease expires and the server's repossessor service (every 15 s by default) frees it:
the next promotion waits about ``LEASE_SECONDS`` + 15 s. A holder whose renewals keep failing is
interrupted by Prefect (strict mode) rather than acting without the lock. A Prefect server that
keeps leases in memory (its default) forgets them when restarted while a slot is held: that slot
stays taken until freed by hand (``prefect gcl update NAME --active-slots 0``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Literal

from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from flows.core.config import ModelStore

TIMEOUT_SECONDS = 600.0  # how long a promotion waits for the lock before giving up
LEASE_SECONDS = 60.0  # the Prefect slot's lease (the server's minimum), renewed while held


class LockUnavailable(TimeoutError):
    """The promotion lock was not taken: held too long by another promotion, or its Prefect API
    does not answer. Nothing was promoted; trying again later is safe."""


class LockMisconfigured(RuntimeError):
    """The promotion lock cannot serialise promotions as configured; nothing was promoted."""


def prefect_api_url() -> str | None:
    """The Prefect API this process reports to, or None (an ephemeral, in-process server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def lock_kind(store: ModelStore) -> Literal["file", "prefect"]:
    """The lock ``tracking.promote_lock`` names, ``auto`` resolved."""
    kind = store.promote_lock
    if kind == "auto":
        return "prefect" if prefect_api_url() else "file"
    if kind == "prefect" and not prefect_api_url():
        raise LockMisconfigured(
            "tracking.promote_lock is prefect but PREFECT_API_URL is not set: an ephemeral "
            "Prefect server lives inside one process and serialises nothing; set "
            "PREFECT_API_URL to the shared Prefect server, or use promote_lock: file (one "
            "machine only); nothing was promoted"
        )
    return kind


def limit_name(store: ModelStore) -> str:
    """The Prefect global concurrency limit of this registered model's promotions."""
    return "forgetless-promote-" + re.sub(r"[/%&<>]", "-", store.model_name)


def file_lock(store: ModelStore) -> FileLock:
    """The file lock: beside a SQLite store, else in the workspace (this machine only)."""
    uri = store.uri
    folder = (
        Path(uri.removeprefix("sqlite:///")).parent
        if uri.startswith("sqlite:///")
        else store.workspace
    )
    path = folder / f".{store.model_name}.promote.lock"
    return FileLock(str(path), timeout=TIMEOUT_SECONDS)


@contextmanager
def promotion_lock(store: ModelStore) -> Iterator[str]:
    """Hold the promotion lock of the store's registered model; yields what it is, in words."""
    kind = lock_kind(store)
    lock = file_lock(store)
    with ExitStack() as stack:
        try:
            stack.enter_context(lock)
        except FileLockTimeout:
            raise LockUnavailable(
                f"the promotion lock {lock.lock_file} was held by another promotion for over "
                f"{TIMEOUT_SECONDS:.0f} s; nothing was promoted — try again once it is done"
            ) from None
        if kind == "file":
            yield f"file lock {lock.lock_file}"
            return
        name = limit_name(store)
        stack.enter_context(prefect_slot(name))
        yield f"Prefect concurrency limit {name} at {prefect_api_url()}"


def ensure_limit(name: str) -> None:
    """Create the limit ``name`` with 1 slot unless it exists; refuse one that does not
    serialise (a limit other than 1, or disabled)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    url = prefect_api_url()
    try:
        with get_client(sync_client=True) as client:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):  # another promotion created it meanwhile
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=1)
                    )
                limit = client.read_global_concurrency_limit_by_name(name)
    except httpx.HTTPError as exc:
        raise LockUnavailable(
            f"Prefect API {url} is unreachable ({type(exc).__name__}: {exc}), so the promotion "
            f"lock {name} cannot be taken; nothing was promoted — start the Prefect server or "
            "fix PREFECT_API_URL, then run again (`forgetless resume RUN_DIR` finishes a retrain)"
        ) from exc
    if limit.limit != 1 or not limit.active:
        raise LockMisconfigured(
            f"the Prefect concurrency limit {name} at {url} has limit {limit.limit} and is "
            f"{'active' if limit.active else 'disabled'}: it must be an active limit of 1 to "
            f"serialise promotions (`prefect gcl update {name} --limit 1 --enable`); nothing "
            "was promoted"
        )


def holder():
    """The Prefect task or flow run taking the lock (shown by ``prefect gcl inspect``)."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import FlowRunContext, TaskRunContext

    if (task := TaskRunContext.get()) is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task.task_run.id)
    if (flow := FlowRunContext.get()) is not None and flow.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow.flow_run.id)
    return None


@contextmanager
def prefect_slot(name: str) -> Iterator[None]:
    """Hold the single slot of the Prefect global concurrency limit ``name``."""
    from prefect.concurrency.asyncio import (
        AcquireConcurrencySlotTimeoutError,
        ConcurrencySlotAcquisitionError,
    )
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    url = prefect_api_url()
    with ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(
                    name,
                    occupy=1,
                    timeout_seconds=TIMEOUT_SECONDS,
                    lease_duration=LEASE_SECONDS,
                    strict=True,  # a missing limit is an error, never a promotion unlocked
                    holder=holder(),
                )
            )
        except AcquireConcurrencySlotTimeoutError:
            raise LockUnavailable(
                f"the promotion lock {name} at {url} was held by another promotion for over "
                f"{TIMEOUT_SECONDS:.0f} s; nothing was promoted — try again once it is done "
                f"(a slot left by a restarted Prefect server: `prefect gcl inspect {name}`)"
            ) from None
        except ConcurrencySlotAcquisitionError as exc:
            raise LockUnavailable(
                f"the promotion lock {name} could not be taken from the Prefect API {url} "
                f"({exc}; {exc.__cause__!r}); nothing was promoted — check the Prefect server, "
                "then run again"
            ) from exc
        yield
