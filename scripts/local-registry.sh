#!/usr/bin/env bash
# A throwaway OCI registry on 127.0.0.1 for trying the builtin engine by hand:
#   scripts/local-registry.sh [PORT]          (default 5000; Ctrl-C stops it, storage is removed)
# Push an image to it with skopeo, for example from an OCI layout directory:
#   skopeo copy --dest-tls-verify=false oci:LAYOUT:TAG docker://127.0.0.1:5000/team/app:TAG
# then submit it:
#   .venv/bin/ihctl submit image --registry 127.0.0.1:5000 --repository team/app --tag TAG
# Needs Debian's docker-registry (apt-get install docker-registry skopeo).
set -euo pipefail
port="${1:-5000}"
command -v docker-registry >/dev/null || { echo "apt-get install docker-registry" >&2; exit 1; }
dir="$(mktemp -d)"
pid=""
stop() {
  trap - EXIT INT TERM
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT INT TERM
cat >"$dir/config.yml" <<CONFIG
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
CONFIG
echo "registry on 127.0.0.1:$port (storage $dir/storage)"
docker-registry serve "$dir/config.yml" &
pid=$!
wait "$pid"
