#!/usr/bin/env bash
# Fill a wheelhouse for the offline image build: torch 2.13.0 (CPU) and every
# runtime dependency of the image, as wheels for the image's Python (3.11).
#
#   scripts/fill-wheelhouse.sh [DIR]          # DIR defaults to wheelhouse/ in the repo
#   docker build --network none -t fedland:latest .
#
# Run it on a Linux x86_64 host with Python 3.11 that reaches a package index
# (or has the wheels locally). torch comes from a local wheel when pip finds
# one without an index (e.g. a find-links directory in pip.conf), otherwise
# from PyTorch's CPU index (TORCH_INDEX_URL). Knobs: PYTHON (python3),
# TORCH_INDEX_URL (https://download.pytorch.org/whl/cpu).
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$repo_dir/wheelhouse}"
python="${PYTHON:-python3}"
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
torch="torch==2.13.0"
mkdir -p "$dir"

"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the image runs Python 3.11"' || {
    echo "fill-wheelhouse: $python is not Python 3.11 (set PYTHON)" >&2
    exit 1
}
pip=("$python" -m pip download --quiet --only-binary=:all: --dest "$dir")

# torch: a CPU build only, never PyPI's CUDA one.
if ! "${pip[@]}" --no-deps --no-index "$torch" 2>/dev/null; then
    "${pip[@]}" --no-deps --index-url "$torch_index" "$torch"
fi

# torch's own dependencies and the image's (pyproject's dependencies + the
# `stack` extra), resolved against the torch wheel now in $dir.
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
"$python" - "$repo_dir/pyproject.toml" >"$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["stack"]))
PY
"${pip[@]}" --find-links "$dir" "$torch" -r "$requirements"
echo "fill-wheelhouse: $(find "$dir" -name '*.whl' | wc -l) wheels in $dir" >&2
