# localchat service image.
#   CPU (default):  docker build -t localchat .
#   GPU:            docker build -t localchat:gpu \
#                     --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg ONNXRUNTIME=onnxruntime-gpu .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Which ONNX Runtime package to end up with: onnxruntime (CPU) or onnxruntime-gpu (CUDA 13, cuDNN 9).
ARG ONNXRUNTIME=onnxruntime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH

# The CUDA base images carry no Python: install the distribution's python3 and venv module there.
RUN if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY tui_client ./tui_client
COPY sql ./sql
COPY schema ./schema

# Editable, so that the migrations in /app/sql stay beside the code that applies them (service/store).
# The two ONNX Runtime packages write the same onnxruntime/ folder: remove one before adding the other.
RUN pip install -e . \
    && if [ "${ONNXRUNTIME}" != "onnxruntime" ]; then \
        pip uninstall -y onnxruntime && pip install "${ONNXRUNTIME}"; \
    fi

RUN useradd --system --create-home --home-dir /home/localchat localchat \
    && mkdir -p /data && chown localchat /data
USER localchat
VOLUME ["/data"]
EXPOSE 8765

HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=4)"]

ENTRYPOINT ["python", "-m", "service"]
CMD ["--host", "0.0.0.0", "--data-dir", "/data"]
