"""``execute_job``: the one job function, run by the Celery task and by the embedded worker thread.

claim → fetch inputs → ``vdu_core.run.run_unlearning`` (progress → heartbeat events, cancel → the
job's status) → archive the checkpoint → publish artifacts under a temporary prefix and move them
into place → ``succeeded`` with their locations and sha256. Library errors end ``failed`` with
``error {code, message}``; a cancel ends ``cancelled``. Every database call retries transient
errors with backoff, so a Postgres restart costs a pause, not the job.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import ledger
from jobs.db import retry_transient, session_scope
from jobs.errors import StorageError
from jobs.logs import job_id_var
from jobs.settings import Settings
from jobs.storage import Storage, get_storage
from jobs.tables import ForgetSet, Job, JobStatus, Model
from vdu_core.errors import Cancelled, ModelCollapsed, VDUError

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.tar"


class InputMissing(VDUError):
    code = "input_missing"


class LeaseLost(Exception):
    """Another attempt owns the job now (our lease expired): stop without touching it."""


def _json_safe(value: Any) -> Any:
    """Plain JSON for the ledger: non-finite floats become None, unknown objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return str(value)


@dataclass
class JobInputs:
    job_id: str
    team_id: str
    attempt: int
    params: dict
    evaluation: dict
    model: Model
    forget_set: ForgetSet | None


class JobRun:
    """Everything one attempt of one job needs; ``execute`` drives it."""

    def __init__(self, job_id: str, settings: Settings, storage: Storage | None = None):
        self.job_id = job_id
        self.settings = settings
        self.storage = storage or get_storage(settings)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._last_progress = 0.0
        self._last_cancel_poll = 0.0
        self._progress: dict | None = None

    # --- database, with retries -----------------------------------------------------------------
    def tx(self, fn, what: str):
        def attempt():
            with session_scope(self.settings) as session:
                return fn(session)

        return retry_transient(attempt, max_seconds=self.settings.db_retry_max_s, what=what)

    def claim(self) -> JobInputs | None:
        def do(session):
            job = ledger.claim(session, self.job_id, self.worker_id, self.settings.lease_seconds)
            if job is None:
                job = session.get(Job, self.job_id)
                # a retried claim whose first commit did land is still ours
                if job is None or job.worker_id != self.worker_id or job.status != JobStatus.running.value:
                    return None
            model = session.get(Model, job.model_id)
            fs = session.get(ForgetSet, job.forget_set_id) if job.forget_set_id else None
            session.expunge_all()
            return JobInputs(job.id, job.team_id, job.attempt, job.params, job.evaluation, model, fs)

        return self.tx(do, "claim")

    def heartbeat(self, progress: dict | None = None) -> None:
        status = self.tx(
            lambda s: ledger.heartbeat(s, self.job_id, self.worker_id, self.settings.lease_seconds, progress),
            "heartbeat",
        )
        if status is None:
            self.lost.set()
            raise LeaseLost(self.job_id)
        if status == JobStatus.cancelling.value:
            self.cancel_requested.set()

    # --- callbacks given to the library ---------------------------------------------------------
    def on_progress(self, p) -> None:
        progress = _json_safe(p.to_dict())
        self._progress = progress
        now = time.monotonic()
        last_of_phase = p.total and p.step >= p.total
        if not last_of_phase and now - self._last_progress < self.settings.progress_interval_s:
            return
        self._last_progress = now
        try:
            self.heartbeat(progress)
        except LeaseLost:
            pass  # should_cancel stops the loop
        except Exception as exc:  # the database is away: the lease keeper keeps trying
            log.warning("progress not recorded: %s", type(exc).__name__)

    def should_cancel(self) -> bool:
        if self.cancel_requested.is_set() or self.lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_poll >= self.settings.cancel_poll_interval_s:
            self._last_cancel_poll = now
            try:
                with session_scope(self.settings) as session:
                    status = ledger.current_status(session, self.job_id)
                if status == JobStatus.cancelling.value:
                    self.cancel_requested.set()
                elif status != JobStatus.running.value:
                    self.lost.set()
            except Exception as exc:
                log.debug("cancel poll failed: %s", exc)
        return self.cancel_requested.is_set() or self.lost.is_set()

    def _keep_lease(self) -> None:
        while not self._stop.wait(self.settings.lease_renew_interval_s):
            try:
                self.heartbeat()
            except LeaseLost:
                log.warning("lease lost: another attempt owns the job now")
                return
            except Exception as exc:
                log.warning("lease renewal failed (will retry): %s", type(exc).__name__)

    # --- the run --------------------------------------------------------------------------------
    def run_library(self, inputs: JobInputs, workdir: Path) -> Any:
        from vdu_core.config import EvalConfig, UnlearnConfig
        from vdu_core.run import run_unlearning  # imports torch: only ever inside the job
        from worker.fetch import fetch_forget_set, fetch_model

        if inputs.forget_set is None:
            raise InputMissing("the job's forget set was deleted", field="forget_set")
        forget = fetch_forget_set(inputs.forget_set.storage_key, inputs.forget_set.filename, self.storage, workdir)
        model = fetch_model(inputs.model, self.storage, self.settings, workdir)
        from vdu_core.sd.models import is_sd_model

        if is_sd_model(model.ref, revision=model.revision):  # text-conditional: vdu_core.sd (extra "sd")
            from vdu_core.sd.run import run_job

            return run_job(model.ref, forget, workdir / "out", inputs.params, inputs.evaluation,
                           lineage=model.lineage, revision=model.revision,
                           limits=self.settings.forget_set_limits(),
                           cache_dir=self.settings.model_cache_dir or Path(tempfile.gettempdir()) / "vdu-cache",
                           on_progress=self.on_progress, should_cancel=self.should_cancel)
        config = UnlearnConfig.from_dict(inputs.params, prefix="params")
        evaluation = EvalConfig.from_dict(inputs.evaluation, prefix="evaluation")
        cache_dir = self.settings.model_cache_dir or Path(tempfile.gettempdir()) / "vdu-cache"
        return run_unlearning(
            model.ref,
            forget,
            workdir / "out",
            config,
            evaluation,
            lineage=model.lineage,
            revision=model.revision,
            limits=self.settings.forget_set_limits(),
            cache_dir=cache_dir,
            on_progress=self.on_progress,
            should_cancel=self.should_cancel,
            max_trajectory_bytes=self.settings.max_trajectory_bytes,
        )

    def publish(self, inputs: JobInputs, out_dir: Path, known: dict[str, str], *, with_checkpoint: bool = True) -> dict:
        """Archive the pipeline folder, then write everything under a temporary prefix and move it
        into ``teams/{team}/jobs/{job}/``; return the manifest recorded on the job."""
        if with_checkpoint:
            archive = out_dir.parent / CHECKPOINT_NAME
            write_checkpoint_archive(out_dir, archive)
            archive.replace(out_dir / CHECKPOINT_NAME)
        sizes = {rel: (out_dir / rel).stat().st_size for rel in _files(out_dir)}
        hashes = {rel: known.get(rel) or sha256_file(out_dir / rel) for rel in sizes}
        self.heartbeat(self._progress)  # still ours? (a zombie attempt must not overwrite a newer one)
        prefix = f"teams/{inputs.team_id}/jobs/{inputs.job_id}"
        keys = self.storage.publish_dir(out_dir, prefix)
        files = {rel: {"key": keys[rel], "size": sizes[rel], "sha256": hashes[rel]} for rel in sorted(keys)}
        return {"prefix": prefix, "files": files, "checkpoint": CHECKPOINT_NAME if with_checkpoint else None}

    def execute(self) -> str:
        inputs = self.claim()
        if inputs is None:
            log.info(
                "job %s: nothing to claim (a duplicate delivery, or it is no longer queued)",
                self.job_id,
                extra={"event": "claim_skipped"},
            )
            return "skipped"
        log.info("job %s: attempt %d started", self.job_id, inputs.attempt, extra={"event": "job_started"})
        keeper = threading.Thread(target=self._keep_lease, name=f"lease-{self.job_id}", daemon=True)
        keeper.start()
        try:
            with tempfile.TemporaryDirectory(dir=self.settings.worker_tmp_dir, prefix=f"vdu-{self.job_id}-") as tmp:
                workdir = Path(tmp)
                try:
                    result = self.run_library(inputs, workdir)
                except ModelCollapsed as exc:
                    return self._collapsed(inputs, workdir / "out", exc)
                manifest = self.publish(inputs, Path(result.out_dir), dict(result.artifacts))
            metrics = _json_safe(result.metrics)
            done = self.tx(
                lambda s: ledger.succeed(s, self.job_id, self.worker_id, metrics=metrics, artifacts=manifest), "succeed"
            )
            if done is None:
                raise LeaseLost(self.job_id)
            log.info("job %s succeeded", self.job_id, extra={"event": "job_succeeded"})
            return "succeeded"
        except LeaseLost:
            log.warning("job %s: this attempt lost the job; its result is discarded", self.job_id)
            return "lost"
        except Cancelled:
            if self.lost.is_set():
                return "lost"
            self.tx(lambda s: ledger.finish_cancelled(s, self.job_id, self.worker_id), "cancel")
            log.info("job %s cancelled", self.job_id, extra={"event": "job_cancelled"})
            return "cancelled"
        except VDUError as exc:
            return self._fail(exc.code, exc.message, exc.field)
        except StorageError as exc:
            return self._fail("storage_error", f"artifact storage failed: {exc.message}", None)
        except Exception as exc:
            from celery.exceptions import SoftTimeLimitExceeded

            if isinstance(exc, SoftTimeLimitExceeded):
                return self._fail(
                    "time_limit", f"the job ran past its time limit ({self.settings.job_soft_time_limit_s}s)", None
                )
            log.exception("job %s failed unexpectedly", self.job_id)
            return self._fail("internal_error", f"{type(exc).__name__}: {exc}"[:500], None)
        finally:
            self._stop.set()
            keeper.join(timeout=5)

    def _fail(self, code: str, message: str, field: str | None, artifacts: dict | None = None) -> str:
        log.warning("job %s failed: %s: %s", self.job_id, code, message, extra={"event": "job_failed"})
        self.tx(
            lambda s: ledger.fail(
                s, self.job_id, self.worker_id, code=code, message=message, field=field, artifacts=artifacts
            ),
            "fail",
        )
        return "failed"

    def _collapsed(self, inputs: JobInputs, out_dir: Path, exc: ModelCollapsed) -> str:
        """A collapsed model is a failure, but its evidence (metrics, grids, card) is published."""
        message = exc.message.replace(str(out_dir), "the job's artifacts")
        evidence = None
        if out_dir.is_dir():
            try:
                evidence = self.publish(inputs, out_dir, {}, with_checkpoint=False)
            except (StorageError, OSError) as err:
                log.warning("could not publish the evidence of a collapsed run: %s", err)
        return self._fail(exc.code, message, exc.field, artifacts=evidence)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_checkpoint_archive(folder: Path, dest: Path) -> None:
    """A deterministic tar of ``folder`` (sorted names, zero mtimes and owners): extracting it gives
    the folder that ``DiffusionPipeline.from_pretrained`` loads."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for rel in _files(folder):
            info = tf.gettarinfo(str(folder / rel), arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(folder / rel, "rb") as fh:
                tf.addfile(info, fh)


def execute_job(job_id: str, settings: Settings, storage: Storage | None = None) -> str:
    """Run one attempt of ``job_id``; returns what happened (succeeded, failed, cancelled, skipped, lost)."""
    token = job_id_var.set(job_id)
    try:
        return JobRun(job_id, settings, storage).execute()
    finally:
        job_id_var.reset(token)
