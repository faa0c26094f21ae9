# CLL TME Atlas explorer: gunicorn serving app.wsgi:server, atlas mounted read-only.
#
#   docker build -t cll-tme-atlas .
#   docker run -d --name tme-atlas -p 127.0.0.1:8050:8050 \
#       -v /srv/atlases/cll:/data/atlas:ro cll-tme-atlas
#
# Configuration is by environment variables (see README "Hosting"):
#   TME_ATLAS_ATLAS            atlas directory inside the container (default /data/atlas)
#   TME_ATLAS_CONFIG           a YAML/JSON/TOML config file (e.g. mounted at /config/atlas.yaml)
#   TME_ATLAS__SERVE__PORT     port (8050); TME_ATLAS__AUTH__ENABLED=true + users in the file
#   TME_ATLAS_WORKERS / TME_ATLAS_THREADS   gunicorn processes / threads per process
#
# The CMD below is byte-for-byte the command tests/test_hosting.py starts (without Docker)
# against a synthetic atlas; keep the two identical (the test parses this file).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TME_ATLAS_NO_PROGRESS=1

WORKDIR /opt/tme-atlas

# CPU-only torch first, from PyTorch's CPU wheel index: a plain `pip install torch` would pull
# gigabytes of CUDA libraries. (The version is the one pinned in requirements/constraints.txt.
# Where the CPU index cannot be reached, mirror the wheel and use --find-links instead.)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# dependencies, pinned by the project's constraints file, then the project itself
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY tme_atlas/ tme_atlas/
COPY preprocessing/ preprocessing/
COPY atlas/ atlas/
COPY app/ app/
COPY references/ references/
RUN pip install -c requirements/constraints.txt . \
    && python -c "import app.security, app.registry, atlas.config"

# an unprivileged user; the code is owned by root and read-only for it
RUN useradd --system --uid 10001 --user-group --home-dir /home/tme --create-home \
        --shell /usr/sbin/nologin tme \
    && mkdir -p /data/atlas && chown root:root /data/atlas
USER tme

ENV TME_ATLAS_ATLAS=/data/atlas \
    TME_ATLAS__SERVE__HOST=0.0.0.0 \
    TME_ATLAS__SERVE__PORT=8050

# the atlas directory, mounted read-only: docker run -v /srv/atlas:/data/atlas:ro
VOLUME ["/data/atlas"]
EXPOSE 8050

# /healthz: 200 when the atlas can be opened, 503 otherwise (public even with auth on)
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TME_ATLAS__SERVE__PORT', '8050'), timeout=4)"]

CMD ["gunicorn", "-c", "app/gunicorn_conf.py", "app.wsgi:server"]
