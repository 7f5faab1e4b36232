#!/usr/bin/env bash
# A base image without any registry: Debian bookworm (debootstrap --variant=minbase) from the
# mirror apt already uses here, with python3, python3-venv and ca-certificates, imported into
# podman. Needs root, debootstrap and podman.
#
#   scripts/make-base-image.sh [TAG] [CACHE_DIR]
#
# The root filesystem is kept as CACHE_DIR/bookworm-minbase.tar (default
# ~/.cache/image-handler-tests): with it, a rerun only imports it (seconds); with TAG already in
# podman, nothing is done.
set -euo pipefail
tag="${1:-localhost/image-handler-base:bookworm}"
cache="${2:-${XDG_CACHE_HOME:-$HOME/.cache}/image-handler-tests}"
tarball="$cache/bookworm-minbase.tar"

if podman image exists "$tag"; then
  echo "$tag exists"; exit 0
fi
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  # The Debian mirror of this machine's own apt sources.
  mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' \
    | awk '$2 == "bookworm" { print $1; exit }')
  if [ -z "$mirror" ]; then
    echo "make-base-image.sh: apt has no bookworm source to debootstrap from" >&2; exit 1
  fi
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$cache/bookworm-minbase.debootstrap.log" 2>&1 \
    || { echo "debootstrap failed: see $cache/bookworm-minbase.debootstrap.log" >&2; exit 1; }
  # Nothing of the build host's apt state in the image.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
fi
podman import --quiet "$tarball" "$tag" >/dev/null
echo "imported $tag from $tarball"
