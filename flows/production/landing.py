"""Landing releases: teams hand releases over through a landing zone, and scheduled retrains
take them from it one at a time, oldest first, each content once.

``forgetless submit DIR`` validates the release with :func:`flows.steps.validate.validate_step` (the
rules of ``forgetless validate`` and of the flow) and lands it in ``data.landing``: a local
folder or any fsspec URL (``s3://bucket/releases/``), opened with ``fsspec.core.url_to_fs``::

    <landing>/<name>--<hash[:16]>/train.jsonl, eval.jsonl, ...   the release's top-level files
    <landing>/<name>--<hash[:16]>/_LANDED                        written last: name, hash, time

A folder is landed when it holds ``_LANDED``, on every filesystem. On a local disk the folder is
written under a hidden name (``.incoming-...``) and renamed into place, so it appears whole at
once; on an object store, where a rename is a copy, the files are uploaded in place and the
marker last: a folder without it is an upload in progress (or an abandoned one) and is never
trained on. Then a Prefect event ``forgetless.release.landed`` names the release and its hash.

The content hash is :func:`flows.steps.validate.release_content_hash` (SHA-256 of the records without
their ids, canonical JSON, sorted): the hash validation compares learned releases by, so ids,
record order and layout do not make new content. The same content lands once, whatever its name.

A retrain with no release named (``forgetless run``; ``data.release`` null) trains the oldest
landed release (by the marker's landing time) whose hash is not in the ledger,
``<workspace>/landing_ledger.jsonl``: one JSON line per processed hash, appended when a retrain
reaches its gate decision (``passed``/``failed``, with the registered version and run folder) or
when the version or validate step refuses a landed release (``rejected``, with the reason: it
would be refused again on every tick), and committed to the workspace's git.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from flows.core.data import RELEASE_NAME, RELEASE_NAME_RULE, DataError
from flows.core.records import ChampionRef, Record
from flows.core.workspace import git
from flows.steps.validate import ValidateStep, ValidationFailed, release_content_hash, validate_step

if TYPE_CHECKING:  # flows.core.config imports torch (through cf_strategies); the CLI imports this
    from prefect.events import Event

    from flows.core.config import Params

MARKER = "_LANDED"
LEDGER = "landing_ledger.jsonl"
EVENT = "forgetless.release.landed"
log = logging.getLogger(__name__)


class LandingError(RuntimeError):
    """The landing zone cannot be opened or written, or holds a broken release; names it."""


class LandedRelease(Record):
    """A release in the landing zone, as its ``_LANDED`` marker describes it."""

    name: str
    hash: str  # release_content_hash of its records
    uri: str  # the landed folder (where it was found)
    landed_at: datetime  # when its marker was written: the order releases are trained in
    files: list[str]


class Submission(Record):
    """What ``forgetless submit`` did: landed the release, or found its content landed."""

    release: LandedRelease
    new: bool  # False: the same content was already landed; nothing was written
    event_id: str | None = None  # the forgetless.release.landed event (None: none sent)


class LedgerEntry(Record):
    """One processed content hash: trained to a gate decision, or refused before training."""

    hash: str
    release: str
    decision: Literal["passed", "failed", "rejected"]
    version: str | None = None  # the registered model version (None when rejected)
    run_dir: str | None = None
    landed_as: str | None = None  # the landed folder; None: a retrain on demand (--release)
    reason: str = ""  # why it was rejected
    at: datetime


class LandingPick(Record):
    """What a scheduled retrain found in the landing zone; ``release`` None: nothing new."""

    landing: str
    landed: int  # releases landed (folders with a marker)
    processed: int  # of those, the ones whose hash is in the ledger
    release: LandedRelease | None = None
    staged: Path | None = None  # its local copy, named after the release, for the version step


class NoNewRelease(Record):
    """The retrain flow's result when the landing zone holds nothing unprocessed."""

    landing: str
    landed: int
    message: str


def landing_url(params: Params) -> str:
    """``data.landing`` as a URL or an absolute local path (relative to params.yaml)."""
    raw = params.data.landing
    if raw is None:
        raise LandingError(
            "data.landing is not set in params.yaml: set it to a folder or a URL "
            "(e.g. s3://bucket/releases/) to land releases"
        )
    return raw if "://" in raw else str(params.path(raw))


def open_landing(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem and root path of a landing URL."""
    try:
        fs, root = url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise LandingError(f"data.landing {url!r} cannot be opened: {exc}") from exc
    return fs, root.rstrip("/") or "/"


def _child(url: str, name: str) -> str:
    """A folder of the landing zone as the user spelt the zone (``s3://bucket/releases/x``)."""
    return f"{url.rstrip('/')}/{name}"


def landed_releases(url: str) -> list[LandedRelease]:
    """Every landed release (a folder with a marker), oldest landing first."""
    fs, root = open_landing(url)
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=True):
        folder = entry["name"].rstrip("/")
        name = folder.rsplit("/", 1)[-1]
        if entry["type"] != "directory" or name.startswith("."):
            continue
        marker = f"{folder}/{MARKER}"
        if not fs.exists(marker):
            continue  # an upload in progress or an abandoned one: not landed
        try:
            record = LandedRelease.model_validate_json(fs.cat_file(marker))
        except ValidationError as exc:
            log.warning("skipping %s: not a landing marker (%s)", _child(url, name), exc)
            continue
        found.append(record.model_copy(update={"uri": _child(url, name)}))
    return sorted(found, key=lambda r: (r.landed_at, r.uri))


def check_name(release_dir: Path) -> None:
    """The folder name is the release name, and becomes part of a URL: a plain word."""
    if not RELEASE_NAME.fullmatch(release_dir.name):
        raise DataError(release_dir, None, f"{RELEASE_NAME_RULE} (got {release_dir.name!r})")
    if (release_dir / MARKER).exists():
        raise DataError(release_dir / MARKER, None, f"{MARKER} is the landing marker's name")


def submit(params: Params, release_dir: Path, champion: ChampionRef | None = None) -> Submission:
    """Validate ``release_dir`` against the champion (:func:`validate_step`, as ``forgetless
    validate`` does) and land it; a release that fails is not landed (:class:`ValidationFailed`
    names file, line, record and rule)."""
    from flows.registry.tracking import current_champion

    url = landing_url(params)
    open_landing(url)  # a bad URL fails before validation
    release_dir = Path(release_dir).resolve()
    check_name(release_dir)
    report = validate_step(
        ValidateStep.from_params(params),
        release_dir,
        champion or current_champion(params.model_store),
    )
    if not report.passed:
        raise ValidationFailed(report, limit=100)
    return land(release_dir, url, release_content_hash(release_dir))


def land(release_dir: Path, url: str, content_hash: str) -> Submission:
    """Land a validated release: nothing if its content is landed already, else its top-level
    files and the marker (renamed into place on a local disk, the marker last elsewhere), then
    the ``forgetless.release.landed`` event."""
    for landed in landed_releases(url):
        if landed.hash == content_hash:
            return Submission(release=landed, new=False)
    files = sorted(f.name for f in release_dir.iterdir() if f.is_file())
    fs, root = open_landing(url)
    name = f"{release_dir.name}--{content_hash[:16]}"
    folder = f"{root}/{name}"

    def marker() -> bytes:
        record = LandedRelease(
            name=release_dir.name,
            hash=content_hash,
            uri=_child(url, name),
            landed_at=datetime.now(UTC),
            files=files,
        )
        return record.model_dump_json(indent=1).encode()

    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
        incoming = f"{root}/.incoming-{release_dir.name}-{uuid.uuid4().hex[:8]}"
        fs.makedirs(incoming)
        try:
            for file in files:
                fs.put_file(str(release_dir / file), f"{incoming}/{file}")
            fs.pipe_file(f"{incoming}/{MARKER}", marker())
            os.rename(incoming, folder)  # atomic on one filesystem; refused if folder is not empty
        except OSError as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            if fs.exists(f"{folder}/{MARKER}"):  # another submitter landed it meanwhile
                return Submission(release=_read_marker(fs, folder, url), new=False)
            raise LandingError(f"cannot land {release_dir.name} in {url}: {exc}") from exc
    else:
        try:
            fs.makedirs(folder, exist_ok=True)
            for file in files:
                fs.put_file(str(release_dir / file), f"{folder}/{file}")
            fs.pipe_file(f"{folder}/{MARKER}", marker())  # last: now it is landed
        except OSError as exc:
            raise LandingError(
                f"cannot land {release_dir.name} in {url}: {exc} (nothing is landed until "
                f"{MARKER} is written; submit again)"
            ) from exc
    landed = _read_marker(fs, folder, url)
    event = emit_landed(landed, url)
    return Submission(release=landed, new=True, event_id=str(event.id) if event else None)


def _read_marker(fs: AbstractFileSystem, folder: str, url: str) -> LandedRelease:
    record = LandedRelease.model_validate_json(fs.cat_file(f"{folder}/{MARKER}"))
    return record.model_copy(update={"uri": _child(url, folder.rsplit("/", 1)[-1])})


def emit_landed(release: LandedRelease, url: str) -> Event | None:
    """The Prefect event ``forgetless.release.landed`` about the release (resource labels: its
    name and hash), for automations such as a deployment trigger; the emitted event, or None
    when Prefect sends none."""
    from prefect.events import emit_event

    return emit_event(
        EVENT,
        resource={
            "prefect.resource.id": f"forgetless.release.{release.hash}",
            "prefect.resource.name": release.name,
            "forgetless.release.name": release.name,
            "forgetless.release.hash": release.hash,
        },
        payload={
            "uri": release.uri,
            "landing": url,
            "files": release.files,
            "landed_at": release.landed_at.isoformat(),
        },
    )


def read_ledger(ws: Path) -> list[LedgerEntry]:
    """The processed hashes, oldest first (none before the first retrain)."""
    path = ws / LEDGER
    if not path.exists():
        return []
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.model_validate_json(line))
        except ValidationError as exc:
            raise LandingError(f"{path}:{n}: not a ledger entry ({exc})") from None
    return entries


def record(ws: Path, entry: LedgerEntry) -> LedgerEntry:
    """Append ``entry`` to the ledger and commit it in the workspace's git (once it has one)."""
    ws.mkdir(parents=True, exist_ok=True)
    with open(ws / LEDGER, "a", encoding="utf-8") as f:
        f.write(entry.model_dump_json() + "\n")
    if (ws / ".git").exists():
        git(ws, "add", LEDGER)
        message = f"Landing ledger: {entry.release} {entry.hash[:12]} {entry.decision}"
        git(ws, "commit", "-q", "-m", message, "--", LEDGER)
    return entry


def pick(params: Params) -> LandingPick:
    """The oldest landed release whose hash is not in the ledger, copied from the landing zone
    into ``<workspace>/cache/landing/<hash>/<name>`` (the version step reads a local folder).
    A landed folder that changed since it landed (hash or files) is recorded rejected."""
    url = landing_url(params)
    ws = params.workspace_dir
    done = {e.hash for e in read_ledger(ws)}
    landed = landed_releases(url)
    fresh = [r for r in landed if r.hash not in done]
    found = LandingPick(landing=url, landed=len(landed), processed=len(landed) - len(fresh))
    if not fresh:
        return found
    release = fresh[0]
    try:
        staged = stage(release, ws / "cache" / "landing" / release.hash[:16])
    except (FileNotFoundError, DataError, LandingError) as exc:
        reason = f"landed folder {release.uri} is broken: {exc}"
        record(ws, rejected(release, reason))
        raise LandingError(f"{reason}; recorded as rejected in {ws / LEDGER}") from exc
    return found.model_copy(update={"release": release, "staged": staged})


def stage(release: LandedRelease, dest: Path) -> Path:
    """Copy a landed release's files to ``dest/<name>`` and check its content hash."""
    fs, folder = url_to_fs(release.uri)
    target = dest / release.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in release.files:
        fs.get_file(f"{folder.rstrip('/')}/{name}", str(target / name))
    now = release_content_hash(target)
    if now != release.hash:
        raise LandingError(f"its content hash is {now}, not the {release.hash} it landed with")
    return target


def rejected(release: LandedRelease, reason: str, run_dir: Path | None = None) -> LedgerEntry:
    return LedgerEntry(
        hash=release.hash,
        release=release.name,
        decision="rejected",
        run_dir=str(run_dir) if run_dir else None,
        landed_as=release.uri,
        reason=reason,
        at=datetime.now(UTC),
    )


@contextmanager
def rejections_recorded(
    params: Params, release: LandedRelease | None, run_dir: Path
) -> Iterator[None]:
    """Record a landed release that the version or validate step refuses as processed
    (``rejected``): bad input is refused again on every tick. An outage is not recorded."""
    try:
        yield
    except (DataError, ValidationFailed) as exc:
        if release is not None:
            record(params.workspace_dir, rejected(release, str(exc), run_dir))
        raise


def record_processed(
    params: Params,
    release_path: Path,
    passed: bool,
    version: str | None,
    run_dir: Path,
    release: LandedRelease | None,
) -> LedgerEntry:
    """Record a retrain that reached its gate decision: a landed release, or one on demand
    (``--release``, hashed here) so the same content is not trained again when it lands."""
    return record(
        params.workspace_dir,
        LedgerEntry(
            hash=release.hash if release else release_content_hash(release_path),
            release=release.name if release else release_path.name,
            decision="passed" if passed else "failed",
            version=version,
            run_dir=str(run_dir),
            landed_as=release.uri if release else None,
            at=datetime.now(UTC),
        ),
    )


def nothing_new(found: LandingPick) -> NoNewRelease:
    what = f"{found.landed} landed, all processed" if found.landed else "none landed"
    return NoNewRelease(
        landing=found.landing,
        landed=found.landed,
        message=f"no new release in {found.landing} ({what})",
    )
