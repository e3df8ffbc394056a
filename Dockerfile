# syntax=docker/dockerfile:1
# Course Assistant: one image for the API (default command) and the workers
# (`python -m workers run`). Multi-stage: the build stage installs exactly the
# runtime lock (requirements/base.txt, hash-checked, no resolution); the final stage
# copies the virtualenv and runs as an unprivileged user.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY requirements/base.txt requirements/base.txt
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/base.txt
COPY pyproject.toml README.md ./
COPY api api
COPY rag rag
COPY workers workers
COPY sql sql
COPY devtools devtools
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . && /opt/venv/bin/pip check

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --home-dir /app --create-home app
COPY --from=build /opt/venv /opt/venv
COPY --chown=app:app courses /app/courses
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json \
    API_HOST=0.0.0.0 \
    WORKER_METRICS_HOST=0.0.0.0 \
    DATA_DIR=/app/data
USER 10001:10001
WORKDIR /app
EXPOSE 8000 9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["python", "-m", "api"]
