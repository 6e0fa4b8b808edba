"""The Celery app of the GPU workers.

    celery -A worker.celery_app worker -Q training --concurrency 1 --prefetch-multiplier 1 \
        --max-tasks-per-child 1 -n vdu@%h      (or: python -m worker.cli)

One worker per GPU; a fresh child process per job (torch is imported only there); acks after the
task (a crash does not lose the message before the ledger knows). The worker's main process runs
the reaper + reconciler loop (``jobs.maintenance``) in a thread: every worker runs it, and every step
of it is a conditional update, so any number of workers may.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import signals  # noqa: E402

from jobs.logs import configure_logging  # noqa: E402
from jobs.maintenance import MaintenanceLoop  # noqa: E402
from jobs.queue import CeleryDispatcher, make_celery_app  # noqa: E402
from jobs.settings import get_settings  # noqa: E402
from jobs.webhook_delivery import WebhookLoop  # noqa: E402

settings = get_settings()
app = make_celery_app(settings, main="worker")
app.conf.include = ["worker.tasks"]
_maintenance: MaintenanceLoop | None = None
_webhooks: WebhookLoop | None = None


@signals.setup_logging.connect
def _setup_logging(**_kwargs):
    configure_logging(settings.log_level, settings.log_json)


@signals.worker_init.connect
def _preload(**_kwargs):
    """``worker_preload``: pay the 10-30 s import of torch + diffusers once, not once per job."""
    if settings.worker_preload:
        import diffusers  # noqa: F401
        from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: F401

        import vdu_core.run  # noqa: F401
        from vdu_core import anchors, forget_set, loop, methods, models, posterior  # noqa: F401


@signals.worker_ready.connect
def _start_maintenance(sender=None, **_kwargs):
    global _maintenance, _webhooks
    if _maintenance is None:
        _maintenance = MaintenanceLoop(settings, CeleryDispatcher(settings, app)).start()
    if _webhooks is None:  # webhook delivery (jobs.webhook_delivery) also runs in the main process
        _webhooks = WebhookLoop(settings).start()


@signals.worker_shutdown.connect
def _stop_maintenance(**_kwargs):
    if _maintenance is not None:
        _maintenance.stop()
    if _webhooks is not None:
        _webhooks.stop()


@signals.worker_process_init.connect
def _child_init(**_kwargs):
    from jobs.db import dispose_all

    dispose_all(close=False)  # connections inherited from the parent belong to the parent
