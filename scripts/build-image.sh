#!/usr/bin/env bash
# Build the image hermetically (`make image`): the project's wheel and every dependency's are
# built here with pip, put in a build context of their own, and the Containerfile installs from
# them alone (--no-index) in a build that has no network (--network none).
#
#   scripts/build-image.sh [--tag NAME:TAG] [--base IMAGE] [--builder podman|docker]
#
# PIP (default: pip) builds the wheels; the base defaults to the Containerfile's
# (python:3.11-slim); scripts/make-base-image.sh makes one without any registry.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml")
tag="image-handler:$version"
base=""
builder="${BUILDER:-podman}"
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --builder) builder="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# The wheels alone are the context: the build installs them and copies nothing else. The image
# runs both the handler and the builtin-engine scanner, so both extras' wheels go in.
"${PIP:-pip}" wheel --quiet --disable-pip-version-check --wheel-dir "$context/wheels" \
  "$root[server,builtin-engine]"
cp "$root/.dockerignore" "$context/"
# podman: no intermediate images kept (every build starts from fresh wheels anyway).
layers=""
[ "$(basename "$builder")" = podman ] && layers="--layers=false"
"$builder" build --network none $layers ${base:+--build-arg "BASE=$base"} \
  --file "$root/Containerfile" --tag "$tag" "$context"
echo "built $tag"
