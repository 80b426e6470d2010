#!/usr/bin/env bash
# Write the Compose stack's .env from .env.example, filling every variable that
# is empty there (the secrets) with a fresh random value. The file is mode 600.
#
#   scripts/make-env.sh [--force] [PATH]     # PATH defaults to .env in the repo
#
# Refuses to overwrite an existing file unless --force is given: new secrets
# would lock you out of an existing MongoDB volume.
set -euo pipefail

usage() {
    echo "usage: $0 [--force] [PATH]" >&2
    exit 2
}

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
template="$repo_dir/.env.example"
force=0
target=""
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h | --help) usage ;;
        -*) echo "unknown option: $arg" >&2; usage ;;
        *)
            [ -z "$target" ] || usage
            target="$arg"
            ;;
    esac
done
target="${target:-$repo_dir/.env}"

if [ -e "$target" ] && [ "$force" -ne 1 ]; then
    echo "$target exists; not overwriting it (use --force to replace its secrets)" >&2
    exit 1
fi

# 192 random bits as hex: safe unescaped in URIs, YAML and command lines.
random_secret() {
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -hex 24
    else
        python3 -c 'import secrets; print(secrets.token_hex(24))'
    fi
}

tmp="$(mktemp "$(dirname "$target")/.env.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
chmod 600 "$tmp"
while IFS= read -r line || [ -n "$line" ]; do
    if [[ "$line" =~ ^([A-Z][A-Z0-9_]*)=$ ]]; then
        line="${BASH_REMATCH[1]}=$(random_secret)"
    fi
    printf '%s\n' "$line"
done <"$template" >"$tmp"
mv -f "$tmp" "$target"
trap - EXIT
echo "wrote $target (mode 600)" >&2
