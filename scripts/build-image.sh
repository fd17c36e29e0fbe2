#!/usr/bin/env bash
# Build the Docker image with podman on a machine with no Docker daemon and no registry
# (see README "In a container"): Debian's podman, buildah and mmdebstrap, as root.
# The base image python:3.11-slim is stood in for by a Debian bookworm rootfs with
# python3 and pip, made once with mmdebstrap and kept in podman's storage.
set -euo pipefail
cd "$(dirname "$0")/.."
storage=(--storage-driver vfs)
base=docker.io/library/python:3.11-slim
tag=${1:-closeproxy}
if ! podman "${storage[@]}" image exists "$base"; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-pip,python-is-python3,ca-certificates \
        bookworm "$work/rootfs.tar"
    mkdir "$work/root"
    tar -xpf "$work/rootfs.tar" -C "$work/root"
    # pip must reach the package index through this machine's CA bundle, and may install.
    cp /etc/ssl/certs/ca-certificates.crt "$work/root/etc/ssl/certs/ca-certificates.crt"
    rm -f "$work"/root/usr/lib/python3*/EXTERNALLY-MANAGED
    tar -cpf "$work/base.tar" -C "$work/root" .
    podman "${storage[@]}" import "$work/base.tar" "$base" >/dev/null
fi
# --format docker keeps the HEALTHCHECK (the OCI format drops it).
podman "${storage[@]}" build --quiet --pull=never --isolation chroot --network host \
    --format docker -t "$tag" .
