#!/bin/sh
# Lays out a Docker build context for images/*.Dockerfile from static binaries:
#
#   images/stage.sh CONTEXT_DIR PLATFORM BIN_DIR
#   images/stage.sh target/images linux/arm64 target/aarch64-unknown-linux-musl/release
#
# copies BIN_DIR/conductor and BIN_DIR/edge-worker (whichever exist) to
# CONTEXT_DIR/PLATFORM/ and creates the empty CONTEXT_DIR/state/ the images
# use for their writable directories. Run it once per platform, then build
# with CONTEXT_DIR as the context (images/README.md).
set -eu
if [ $# -ne 3 ]; then
    echo "usage: $0 CONTEXT_DIR PLATFORM BIN_DIR   (PLATFORM: linux/amd64, linux/arm64, linux/arm/v7, linux/arm/v6)" >&2
    exit 2
fi
ctx=$1 platform=$2 bin=$3
case $platform in
    linux/*) ;;
    *) echo "$0: PLATFORM must look like linux/arm64, not $platform" >&2; exit 2 ;;
esac
mkdir -p "$ctx/$platform" "$ctx/state"
n=0
for b in conductor edge-worker; do
    if [ -f "$bin/$b" ]; then
        cp "$bin/$b" "$ctx/$platform/$b"
        n=$((n + 1))
    fi
done
if [ "$n" -eq 0 ]; then
    echo "$0: neither $bin/conductor nor $bin/edge-worker exists" >&2
    exit 1
fi
