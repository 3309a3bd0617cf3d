# syntax=docker/dockerfile:1
# durachat image: one image, three roles (`durachat api`, `durachat worker`, `durachat migrate`).
#
# Build stage resolves nothing: `uv sync --frozen` installs exactly what uv.lock pins, so the image
# runs the dependency set CI tested. The runtime stage gets only the virtualenv, no uv and no build
# tooling.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

# Same uv version as the Makefile pins, so the lockfile is read by the tool that wrote it.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/durachat/venv

WORKDIR /src

# Dependencies first, from the lockfile alone: this layer is reused until uv.lock changes, however
# often the code does.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project

COPY . .
# --no-editable installs the project as a wheel into the venv, so the runtime stage does not need
# the source tree (migrations ship inside the wheel).
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable


FROM ${PYTHON_IMAGE} AS runtime

# A fixed, unprivileged uid so volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 durachat \
 && useradd --system --uid 10001 --gid durachat --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin durachat \
 && install -d -o durachat -g durachat /var/lib/durachat

# The venv's interpreter symlinks to /usr/local/bin/python3.11, which both stages share.
COPY --from=build /opt/durachat/venv /opt/durachat/venv

ENV PATH=/opt/durachat/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DURACHAT_DATA_DIR=/var/lib/durachat

USER durachat:durachat
WORKDIR /var/lib/durachat

EXPOSE 8000
# Exec form: the process receives SIGTERM directly and can drain (the worker finishes or hands back
# its activities, the api closes its streams).
ENTRYPOINT ["durachat"]
CMD ["api"]
