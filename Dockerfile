# boneage: the CLI, the web service and training in one image.
#
#   docker build -t boneage .                                          # CPU torch (default)
#   docker build -t boneage:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --rm -p 8000:8000 -v "$PWD/runs:/models:ro" boneage \
#       serve --checkpoint /models/cpu-small/best.pt --host 0.0.0.0
#
# `make image-local` runs the first build, `make image` builds it on the Apolo platform (apolo-flow build
# boneage, see .apolo/live.yml). Two stages: `build` installs everything into a virtual environment,
# `runtime` copies that environment onto a clean base and runs as an unprivileged user.

# Pinned base: Python 3.11 on Debian 12 (bookworm), the interpreter the project is tested with.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Where the torch wheels come from: .../whl/cpu (small, no CUDA) or .../whl/cu128 (CUDA 12.8) etc.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The same order as `make setup-local`: the torch pair first, then the package with its extras pinned by
# the constraints file.
COPY requirements-dev.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -c requirements-dev.txt ".[app,dicom,gradcam,onnx]" \
    && boneage --version

FROM ${PYTHON_IMAGE} AS runtime
COPY apt.txt /tmp/apt.txt
RUN apt-get update \
    && grep -v '^#' /tmp/apt.txt | xargs --no-run-if-empty apt-get install --yes --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/apt.txt \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin boneage
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 BONEAGE_CACHE_DIR=/home/boneage/.cache/boneage
USER boneage
WORKDIR /home/boneage
EXPOSE 8000
ENTRYPOINT ["boneage"]
CMD ["--help"]
