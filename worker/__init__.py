"""The GPU worker: a Celery app whose one task runs an unlearning job (``worker.runner.execute_job``).

torch and ``vdu_core.run`` are imported inside the job function only, in a fresh process per job.
"""

import os

# Before anything can import torch: idle OpenMP threads must not spin on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
