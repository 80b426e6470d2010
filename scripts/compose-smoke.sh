#!/usr/bin/env bash
# End-to-end smoke test of the Compose stack, for a machine with Docker:
# build, start, scale to 3 clients, queue a tiny 2-round experiment, wait until
# it finishes, check the documents in MongoDB, tear everything down.
#
#   scripts/compose-smoke.sh
#
# It runs as its own project (fedland-smoke) with fresh secrets, its own image
# tag and its own ports, so it never touches a running fedland stack or its
# volumes. Exits non-zero on any failure. Knobs (environment):
#   SMOKE_PORT (18080), SMOKE_ME_PORT (18081), SMOKE_TIMEOUT_S (900),
#   SMOKE_KEEP=1 (leave the stack up for inspection).
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_dir"

port="${SMOKE_PORT:-18080}"
timeout_s="${SMOKE_TIMEOUT_S:-900}"
num_clients=3
work_dir="$(mktemp -d)"
env_file="$work_dir/smoke.env"

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    echo "smoke: neither 'docker compose' nor 'docker-compose' is available" >&2
    exit 1
fi
compose+=(--project-name fedland-smoke --env-file "$env_file" -f compose.yaml)

# The process environment wins over the env file in Compose's interpolation.
export FEDLAND_PORT="$port"
export MONGO_EXPRESS_PORT="${SMOKE_ME_PORT:-18081}"
export SERVER_PUBLISH_ADDRESS=127.0.0.1
export FEDLAND_IMAGE=fedland:smoke

log() { printf 'smoke: %s\n' "$*" >&2; }

cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        log "FAILED (exit $status); last log lines:"
        "${compose[@]}" logs --no-color --tail 40 >&2 || true
    fi
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then
        log "SMOKE_KEEP=1: leaving the stack up; remove it with: ${compose[*]} down -v && rm -r $work_dir"
    else
        "${compose[@]}" down -v --remove-orphans >&2 || true
        rm -rf "$work_dir"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

env_value() { sed -n "s/^$1=//p" "$env_file" | tail -n 1; }

scripts/make-env.sh "$env_file"
token="$(env_value FEDLAND_TOKEN)"
db="$(env_value FEDLAND_DB)"

log "building the image"
"${compose[@]}" build

log "starting the stack with $num_clients clients"
# `up` returns once mongo is healthy, data-init has completed and the server
# is healthy (the depends_on conditions), so a failure there fails here.
"${compose[@]}" up -d --scale "client=$num_clients"
running="$("${compose[@]}" ps --quiet --status running client | wc -l)"
if [ "$running" -ne "$num_clients" ]; then
    log "expected $num_clients running clients, found $running"
    exit 1
fi

# The published port, from this host, with the token (as a researcher would).
health() {
    local url="http://127.0.0.1:$port/api/v1/health"
    if command -v curl >/dev/null 2>&1; then
        curl --fail --silent --show-error --max-time 3 -H "Authorization: Bearer $token" "$url"
    else
        python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(urllib.request.Request(
            sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]}), timeout=3).read().decode())' \
            "$url" "$token"
    fi
}
for _ in $(seq 30); do
    health >/dev/null 2>&1 && break
    sleep 2
done
log "server health from the host: $(health)"

# A tiny experiment: 3 IID clients, 2 rounds, ~1000 examples each, small landscape.
experiments="$work_dir/smoke-experiments.json"
cat >"$experiments" <<'EOF'
{"experiments": [{
  "description": "compose smoke: 3 IID clients, 2 rounds",
  "target_balance_ratios": [
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
  ],
  "subset_fractions": [0.05, 0.05, 0.05],
  "rounds": 2,
  "seed": 1,
  "landscape": {"num_samples": 64, "top_k": 1, "trace_probes": 4, "interpolation_points": 3, "grid_points": 3}
}]}
EOF

log "queueing the experiment"
if python3 -c 'import fedland.spec, launch.launcher' 2>/dev/null; then
    # This machine has the project's Python environment: queue from here,
    # through the published port, exactly as the README shows.
    FEDLAND_TOKEN="$token" python3 main.py --server "http://127.0.0.1:$port" --rounds 2 --experiments "$experiments"
else
    log "(no fedland Python environment here: queueing from inside the server container)"
    # shellcheck disable=SC2016 # $FEDLAND_PORT expands inside the container
    "${compose[@]}" exec -T server sh -c 'cat > /tmp/smoke-experiments.json &&
        python main.py --server "http://127.0.0.1:$FEDLAND_PORT" --rounds 2 --experiments /tmp/smoke-experiments.json' \
        <"$experiments"
fi

log "waiting (at most ${timeout_s}s) for every experiment to finish"
"${compose[@]}" exec -T server python - "$timeout_s" <<'EOF'
import json, os, sys, time, urllib.request

url = "http://127.0.0.1:" + os.environ["FEDLAND_PORT"] + "/api/v1/experiments"
headers = {"Authorization": "Bearer " + os.environ["FEDLAND_TOKEN"]}
deadline = time.monotonic() + float(sys.argv[1])
while True:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        experiments = json.load(response)["experiments"]
    states = [(e["id"], e["status"], e.get("current_round"), e["rounds"]) for e in experiments]
    print("smoke:", states, file=sys.stderr)
    if not experiments:
        sys.exit("smoke: no experiments on the server")
    failed = [e for e in experiments if e["status"] == "failed"]
    if failed:
        sys.exit("smoke: experiments failed: " + json.dumps(failed))
    if all(e["status"] == "finished" for e in experiments):
        sys.exit(0)
    if time.monotonic() > deadline:
        sys.exit("smoke: timed out waiting for the experiments")
    time.sleep(5)
EOF

log "checking the documents in MongoDB"
# Expected from the experiments themselves: one `rounds` document per round and
# one `client_stats` document per client and round, accuracies within [0, 1].
# shellcheck disable=SC2016 # JavaScript template literals, not shell
check_js='
let ok = true;
for (const e of db.experiments.find({})) {
  const id = String(e._id);
  const clients = e.target_balance_ratios.length;
  const rounds = db.rounds.countDocuments({experiment_id: id, test_accuracy: {$gte: 0, $lte: 1}});
  const stats = db.client_stats.countDocuments({experiment_id: id});
  print(`experiment ${id}: ${e.status}, rounds ${rounds}/${e.rounds}, client_stats ${stats}/${e.rounds * clients}`);
  ok = ok && e.status === "finished" && rounds === e.rounds && stats === e.rounds * clients;
}
ok = ok && db.experiments.countDocuments({}) > 0;
if (!ok) { print("document counts do not match"); quit(1); }'
# shellcheck disable=SC2016 # the credentials expand inside the mongo container
"${compose[@]}" exec -T mongo sh -c 'mongosh --quiet --username "$MONGO_INITDB_ROOT_USERNAME" \
    --password "$MONGO_INITDB_ROOT_PASSWORD" --authenticationDatabase admin "$1" --eval "$2"' \
    sh "$db" "$check_js"

log "OK"
