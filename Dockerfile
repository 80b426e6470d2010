# One image for the whole stack: server, clients and the data fetcher differ only
# in the module they run (`python -m server`, `python -m client`,
# `python -m stack.fetch_data`). CPU-only torch keeps it small (no CUDA).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    FEDLAND_DATA_DIR=/data

WORKDIR /app

# Dependencies first, so editing the code does not rebuild these layers.
# torch comes from PyTorch's CPU index; the project declares torch>=2.1, which
# this pin satisfies, so the next step does not pull a CUDA build from PyPI.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# The runtime dependencies and the `stack` extra, read from pyproject.toml
# without installing the project itself (the code is copied below).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['stack']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

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
