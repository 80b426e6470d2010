# One image for the whole stack: server, clients and the data fetcher differ only
# in the module they run (`python -m server`, `python -m client`,
# `python -m stack.fetch_data`). CPU-only torch keeps it small (no CUDA).
#
# Two ways to get the dependencies, chosen by what wheelhouse/ holds:
#   * empty (the default): torch from PyTorch's CPU index, the rest from PyPI;
#   * filled on the host by scripts/fill-wheelhouse.sh: only from those wheels,
#     so the build needs no network at all (docker build --network none).
# The wheels stay in the first stage: the image carries only the installed venv.
FROM python:3.11-slim-bookworm AS deps

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# TORCH_INDEX: where torch comes from without a wheelhouse (compose.gpu.yaml passes a CUDA index).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
COPY wheelhouse/ /wheelhouse/

# torch first, in its own layer: the project declares torch>=2.1, which this pin
# satisfies, so the next step does not pull a CUDA build from PyPI.
RUN if [ -n "$(find /wheelhouse -name 'torch-*.whl' -print -quit)" ]; then \
        pip install --no-cache-dir --no-index --find-links /wheelhouse torch==2.13.0; \
    else \
        pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0; \
    fi

# The runtime dependencies and the `stack` extra, read from pyproject.toml
# without installing the project itself (the code is copied below).
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['stack']))" > /tmp/requirements.txt \
    && if [ -n "$(find /wheelhouse -name 'torch-*.whl' -print -quit)" ]; then \
        pip install --no-cache-dir --no-index --find-links /wheelhouse -r /tmp/requirements.txt; \
    else \
        pip install --no-cache-dir -r /tmp/requirements.txt; \
    fi \
    && rm /tmp/requirements.txt

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    MPLCONFIGDIR=/tmp/matplotlib \
    FEDLAND_DATA_DIR=/data

WORKDIR /app

COPY --from=deps /opt/venv /opt/venv

RUN useradd --no-log-init --create-home --uid 10001 --user-group fedland \
    && mkdir /data \
    && chown fedland:fedland /data

# The code, last: /app is the working directory, so `python -m server` finds it.
COPY fedland ./fedland
COPY stack ./stack
COPY server ./server
COPY client ./client
COPY launch ./launch
COPY reports ./reports
COPY main.py cli.py ./

# A fresh named volume mounted on /data takes that directory's owner (fedland).
USER 10001:10001

CMD ["python", "-m", "server"]
