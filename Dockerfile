# One image, two commands: the exporter (default) and the cleaner (`--entrypoint model-storage-cleaner`).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the scan's C loop (exporter/index/_listing.c), in this stage only; Debian's
# python3 keeps its headers in python3-dev, the python image has them already.
RUN apt-get update -qq \
    && pkgs="gcc libc6-dev" \
    && { [ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
         || pkgs="$pkgs python3-dev"; } \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY shared ./shared
COPY exporter ./exporter
COPY cleaner ./cleaner
# The venv lives at the same path in both stages, so its scripts' shebangs stay valid.
# An optional build secret `build_ca` (a PEM file) is added to pip's CA bundle, for networks whose
# egress re-signs TLS; without it (or empty) pip uses its own bundle. Only this stage sees it.
RUN --mount=type=secret,id=build_ca \
    python -m venv /opt/model-storage/.venv \
    && if [ -s /run/secrets/build_ca ]; then \
         cat "$(/opt/model-storage/.venv/bin/python -c 'import pip._vendor.certifi as c; print(c.where())')" \
             /run/secrets/build_ca > /tmp/pip-ca.pem \
         && export PIP_CERT=/tmp/pip-ca.pem; \
       fi \
    && /opt/model-storage/.venv/bin/pip install . \
    && (cd / && /opt/model-storage/.venv/bin/python -c "import exporter.index._listing") \
    && rm -rf /opt/model-storage/.venv/lib/python*/site-packages/pip /tmp/pip-ca.pem

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 model-storage \
    && useradd --system --uid 10001 --gid model-storage --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin model-storage \
    && install -d -o 10001 -g 10001 /storage
COPY --from=build /opt/model-storage/.venv /opt/model-storage/.venv
ENV PATH=/opt/model-storage/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STORAGE_BASE_PATH=/storage \
    STORAGE_LOG_FORMAT=json
USER 10001:10001
WORKDIR /storage
EXPOSE 8470
# No curl in the slim image: ask /readyz with the standard library, on the port the exporter was given.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('STORAGE_EXPORTER_LISTEN', '127.0.0.1:8470').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4)"]
ENTRYPOINT ["model-storage-exporter"]
