# mcserve container image (see docs/DEPLOY.md).
#
# Targets:
#   cpu  (default, the last stage): CPU build of torch.
#   cuda: CUDA build of torch for GPU nodes. The CUDA runtime, cuDNN and NCCL come as pip wheels
#         (torch's nvidia-* dependencies), so the base stays the same slim Python image and the
#         node only needs the NVIDIA driver and container toolkit; no nvidia/cuda base image.
#
# Layers of a final image, least often changed first: base, user and settings, the virtual
# environment with torch and the other dependencies (/opt/venv), the model bundles and their
# held-out evaluations (what the model pages show: report.json and plots, no Markdown), the
# service code (/opt/app). A code change rebuilds and ships only the last, small layer.
#
# Build arguments:
#   BASE_IMAGE            a Debian-like image with python3 >= 3.11 and its venv module; the
#                         builder and the final stages share it, so the virtual environment's
#                         interpreter path is the same in both. Pinned by digest: a tag moves,
#                         a digest names exactly one image. The default is python:3.11-slim's
#                         multi-platform index at that digest as referenced by public
#                         Dockerfiles; it was not pulled where this file was written (no
#                         registry reachable), so a build that cannot resolve it fails: then
#                         pin the digest you have verified,
#                         `docker buildx imagetools inspect python:3.11-slim` (Digest:).
#   PIP_EXTRA_ARGS        extra pip options for every install, e.g. "--index-url https://mirror/simple",
#                         or "--no-index --find-links /wheels" to install only from a wheelhouse
#                         given as a second build context (what `make image` does):
#                           --build-context wheelhouse=build/wheels
#   TORCH_SPEC            the torch pin; the package itself only asks for a range. Every other
#                         Python package comes from requirements.lock, exact (deploy/lock.py).
#   TORCH_CPU_INDEX_URL   where the CPU build of torch comes from (PyPI's Linux wheel is CUDA).
#   TORCH_CUDA_INDEX_URL  where the CUDA build comes from: PyPI's default Linux wheel, or e.g.
#                         https://download.pytorch.org/whl/cu128 for one CUDA version.
ARG BASE_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# Empty unless the build names a `wheelhouse` context, which then replaces this stage.
FROM scratch AS wheelhouse

# ---- builders: nothing of these stages but /opt/venv and /opt/app reaches an image ----
FROM ${BASE_IMAGE} AS build-base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:${PATH}
RUN python3 -m venv /opt/venv
COPY --from=wheelhouse / /wheels/

# The service itself, outside the venv (on PYTHONPATH), so that it is a layer of its own.
FROM build-base AS app
ARG PIP_EXTRA_ARGS=""
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY service/ service/
# PIP_EXTRA_ARGS holds options, split into words on purpose (SC2086); hadolint reads such a
# variable, and a name pinned by a constraints file, as an unpinned package (DL3013), so the pip
# lines below ignore both rules. The pins are TORCH_SPEC and requirements.lock. The build backend
# at its locked version, and no build isolation (it would fetch the newest setuptools).
# hadolint ignore=DL3013,SC2086
RUN pip install --no-deps --constraint requirements.lock ${PIP_EXTRA_ARGS} setuptools \
    && pip install --no-deps --no-build-isolation --target /opt/app ${PIP_EXTRA_ARGS} .

FROM build-base AS venv-cpu
ARG PIP_EXTRA_ARGS=""
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_CPU_INDEX_URL="https://download.pytorch.org/whl/cpu"
# torch first, in its own layer, without its dependencies: they are in the lock, and the CPU
# index need not carry their locked versions. (Ignored rules: see the app stage.)
# hadolint ignore=DL3013,SC2086
RUN pip install --no-deps --index-url "${TORCH_CPU_INDEX_URL}" ${PIP_EXTRA_ARGS} "${TORCH_SPEC}"
COPY requirements.lock /tmp/
# Everything else exactly as locked: --no-deps, so nothing unlisted comes in, and pip check that
# the set is complete. Then pip leaves the venv; it is no runtime dependency.
# hadolint ignore=SC2086
RUN pip install --no-deps ${PIP_EXTRA_ARGS} --requirement /tmp/requirements.lock \
    && pip check \
    && pip uninstall --yes pip

FROM build-base AS venv-cuda
ARG PIP_EXTRA_ARGS=""
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_CUDA_INDEX_URL="https://pypi.org/simple"
COPY requirements.lock /tmp/
# torch first, with its CUDA libraries (nvidia-*, triton: torch's metadata pins them exactly)
# and its other dependencies at their locked versions. (Ignored rules: see the app stage.)
# hadolint ignore=DL3013,SC2086
RUN pip install --index-url "${TORCH_CUDA_INDEX_URL}" --constraint /tmp/requirements.lock \
    ${PIP_EXTRA_ARGS} "${TORCH_SPEC}"
# Everything else exactly as locked (see venv-cpu).
# hadolint ignore=SC2086
RUN pip install --no-deps ${PIP_EXTRA_ARGS} --requirement /tmp/requirements.lock \
    && pip check \
    && pip uninstall --yes pip

# ---- runtime: the interpreter, a non-root user and the settings; each target adds the rest ----
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 mcserve \
    && useradd --system --no-log-init --uid 10001 --gid mcserve \
       --home-dir /home/mcserve --create-home --shell /usr/sbin/nologin mcserve
# XDG_CACHE_HOME: onnxruntime keeps a cache under it, and numba the mask kernels the compute
# process compiles (a restarted compute process loads them instead); /tmp is the one
# writable path when the root filesystem is read-only (Kubernetes mounts an emptyDir there).
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONPATH=/opt/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    MCSERVE_HOST=0.0.0.0 \
    MCSERVE_PORT=8080 \
    MCSERVE_MODEL_DIR=/opt/mcserve/models \
    MCSERVE_EVALUATION_DIR=/opt/mcserve/evaluation \
    MCSERVE_LOG_LEVEL=info
WORKDIR /home/mcserve
# Numeric, so Kubernetes can check runAsNonRoot without a passwd lookup. Everything copied below
# stays owned by root, read-only for the service (a bundle version is immutable).
USER 10001:10001
EXPOSE 8080
# slim images have no curl; urlopen raises (exit 1) on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MCSERVE_PORT', '8080'), timeout=4)"]
# Settings come from MCSERVE_* variables; arguments after the image name replace `serve`.
ENTRYPOINT ["python", "-m", "service"]
CMD ["serve"]

FROM runtime AS cuda
COPY --from=venv-cuda /opt/venv /opt/venv
COPY models/ /opt/mcserve/models/
COPY docs/evaluation/ /opt/mcserve/evaluation/
COPY --from=app /opt/app /opt/app

# The default target is the last stage.
FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
COPY models/ /opt/mcserve/models/
COPY docs/evaluation/ /opt/mcserve/evaluation/
COPY --from=app /opt/app /opt/app
