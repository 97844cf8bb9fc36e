# Winnow on a CUDA host: docker compose up (or docker run --gpus all -p 8000:8000 winnow MODEL)
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf \
    WINNOW_CACHE_DIR=/data/winnow \
    WINNOW_HOST=0.0.0.0 \
    WINNOW_PORT=8000

# gcc builds the CPU kernels on first use when the container runs without a GPU
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 winnow && mkdir -p /data && chown winnow /data
WORKDIR /opt/winnow
COPY pyproject.toml README.md ./
COPY winnow ./winnow
RUN pip install --no-cache-dir .

USER winnow
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["winnow", "serve"]
