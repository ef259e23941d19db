# syntax=docker/dockerfile:1.7
# The archiver service: `docker run -e ARCHIVER_AUTH_TOKENS=... -p 8080:8080 IMAGE`.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG NODE_IMAGE=node:22.12.0-bookworm-slim

# The viewer's browser assets (hls.js, pinned by viewer/package-lock.json): only the one
# minified file reaches the image; Node.js does not.
FROM ${NODE_IMAGE} AS viewer-assets
WORKDIR /viewer
COPY viewer/package.json viewer/package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install pip==26.3
WORKDIR /src
COPY pyproject.toml README.md ./
COPY archiver ./archiver
# Every dependency comes as a wheel (PyAV bundles FFmpeg): no compiler, no system libraries.
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 archiver \
    && useradd --system --uid 10001 --gid archiver --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin archiver \
    && install --directory --owner=archiver --group=archiver --mode=0750 \
        /var/lib/archiver/spool /var/lib/archiver/tmp /var/lib/archiver/archive
COPY --from=build /opt/venv /opt/venv
COPY --from=viewer-assets /viewer/node_modules/hls.js/dist/hls.min.js /opt/archiver/hls.min.js
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/var/lib/archiver/tmp \
    ARCHIVER_SPOOL_DIR=/var/lib/archiver/spool \
    ARCHIVER_STORE=file:///var/lib/archiver/archive \
    ARCHIVER_VIEWER_HLS_JS_PATH=/opt/archiver/hls.min.js \
    ARCHIVER_LOG_FORMAT=json
# Everything the service writes lives on these volumes, so the root filesystem can be
# read-only. The directories exist with their owner so that a new volume inherits it.
VOLUME ["/var/lib/archiver/spool", "/var/lib/archiver/tmp", "/var/lib/archiver/archive"]
USER 10001:10001
WORKDIR /var/lib/archiver
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ARCHIVER_PORT', '8080') + '/healthz', timeout=2)"]
# Exec form: the service is PID 1 and gets SIGTERM itself, which starts its drain.
ENTRYPOINT ["archiver"]
CMD ["serve"]
