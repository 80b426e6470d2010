#!/usr/bin/env bash
# Write the Compose stack's .env from .env.example, filling every variable that
# is empty there (the secrets) with a fresh random value. The file is mode 600.
#
#   scripts/make-env.sh [--force] [PATH]     # PATH defaults to .env in the repo
#   scripts/make-env.sh --add-missing [PATH]  # keep PATH, append what a newer .env.example added
#
# Refuses to overwrite an existing file unless --force is given: new secrets
# would lock you out of an existing MongoDB volume. --add-missing leaves every
# existing line alone and appends the variables PATH lacks (e.g. a new secret
# such as FEDLAND_WORKER_TOKEN), filled as a fresh file would be.
set -euo pipefail

usage() {
    echo "usage: $0 [--force | --add-missing] [PATH]" >&2
    exit 2
}

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
template="$repo_dir/.env.example"
force=0
add_missing=0
target=""
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --add-missing) add_missing=1 ;;
        -h | --help) usage ;;
        -*) echo "unknown option: $arg" >&2; usage ;;
        *)
            [ -z "$target" ] || usage
            target="$arg"
            ;;
    esac
done
target="${target:-$repo_dir/.env}"

# 192 random bits as hex: safe unescaped in URIs, YAML and command lines.
random_secret() {
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -hex 24
    else
        python3 -c 'import secrets; print(secrets.token_hex(24))'
    fi
}

if [ "$add_missing" -eq 1 ]; then
    [ "$force" -eq 0 ] || usage
    [ -e "$target" ] || { echo "$target does not exist; run $0 without --add-missing" >&2; exit 1; }
    added=0
    while IFS= read -r line || [ -n "$line" ]; do
        if [[ "$line" =~ ^([A-Z][A-Z0-9_]*)=(.*)$ ]]; then
            name="${BASH_REMATCH[1]}"
            value="${BASH_REMATCH[2]}"
            if ! grep -q "^${name}=" "$target"; then
                [ -n "$value" ] || value="$(random_secret)"
                printf '%s=%s\n' "$name" "$value" >>"$target"
                echo "added $name" >&2
                added=$((added + 1))
            fi
        fi
    done <"$template"
    echo "$target: $added variables added" >&2
    exit 0
fi

if [ -e "$target" ] && [ "$force" -ne 1 ]; then
    echo "$target exists; not overwriting it (use --force to replace its secrets)" >&2
    exit 1
fi

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
