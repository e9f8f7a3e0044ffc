# The xbl pipeline image: the Prefect worker (pool "xbl-pool") and the webhook receiver.
# Built from the repository root (infra/compose.yaml sets the context):
#   docker build -f infra/prefect-worker.Dockerfile -t xbl-pipeline:local .
# GPU: --build-arg TORCH_INDEX_URL= (empty) takes torch from the default index, whose Linux
# wheels carry CUDA; infra/README.md has the compose variant.
FROM python:3.11-slim

# CPU wheels by default: the CUDA build is several GB the CPU worker never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    HF_HUB_OFFLINE=1

# git: DVC versions data inside the project's git working copy.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/xbl

# Dependencies first (a code change does not reinstall them). torch comes at the version pinned
# in requirements.txt from TORCH_INDEX_URL; the rest installs as pinned; dvc-s3 lets DVC push
# to the MinIO remote.
COPY requirements.txt ./
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$(grep -E '^torch==' requirements.txt)" \
    && pip install -r requirements.txt \
    && pip install dvc-s3==3.3.0

# Code only: never infra/ (team.env lives there), data, runs or local service state.
COPY pyproject.toml README.md ./
COPY xbl ./xbl
COPY services ./services
COPY webhook ./webhook
COPY tasks ./tasks
COPY flows ./flows
RUN pip install --no-deps -e .

# A non-root user; the named volumes mounted at these paths start out owned by it.
RUN useradd --create-home --uid 10001 xbl \
    && mkdir -p /srv/xbl-project /var/lib/xbl-webhook \
    && chown xbl /srv/xbl-project /var/lib/xbl-webhook
USER xbl

CMD ["prefect", "worker", "start", "--pool", "xbl-pool", "--type", "process"]
