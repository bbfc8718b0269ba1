#!/bin/sh
# Builds the agent for 32-bit Raspberry Pi OS, static (musl), like `cargo pi`
# does for 64-bit:
#
#   sh deploy/build-arm32.sh armv6 [cargo args]   # Pi 1, Zero, Zero W: arm-unknown-linux-musleabihf
#   sh deploy/build-arm32.sh armv7 [cargo args]   # Pi 2, 3, 4 on 32-bit: armv7-unknown-linux-musleabihf
#   sh deploy/build-arm32.sh setup                # only install the tools below
#
# The cargo args default to `-p edge-worker`; `--release` is always given.
# `armv6 --no-default-features` builds the agent without TLS,
# `armv7 -p aerekos-test-service` another package. The binary lands in
# target/<triple>/release/ (or under $CARGO_TARGET_DIR).
#
# rustup ships no std for these two targets here, so std is compiled from
# source (the rust-src component; -Zbuild-std, allowed on stable by
# RUSTC_BOOTSTRAP=1), and `cargo zigbuild` links with Zig's bundled musl
# (link-self-contained=no: rustc has no musl objects of its own for them). Zig
# also compiles ring's C for the TLS build. ziglang and cargo-zigbuild come
# from PyPI at the versions pinned here and are installed when missing or at
# another version. With `cross` (and its images) the same binary builds as
#   cross build --release -p edge-worker --target arm-unknown-linux-musleabihf
set -eu

ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1

usage() {
    echo "usage: sh deploy/build-arm32.sh <armv6|armv7|setup> [cargo args]" >&2
    exit 2
}

setup() {
    installed=$(python3 -c 'import importlib.metadata as m
for p in ("ziglang", "cargo-zigbuild"):
    try:
        print(p + "==" + m.version(p))
    except m.PackageNotFoundError:
        pass' 2>/dev/null || true)
    want="ziglang==$ZIGLANG_VERSION cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
    for w in $want; do
        if ! echo "$installed" | grep -qx "$w"; then
            echo "installing $want (python3 -m pip)"
            # shellcheck disable=SC2086 # two requirement specifiers
            python3 -m pip install --quiet --disable-pip-version-check $want ||
                { echo "cannot install: python3 -m pip install $want" >&2; exit 1; }
            break
        fi
    done
    if ! rustup component list --installed | grep -q '^rust-src'; then
        rustup component add rust-src
    fi
    # pip puts cargo-zigbuild next to python3's other scripts, which need not
    # be on PATH (cargo finds `cargo zigbuild` there).
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    PATH="$PATH:$scripts"
    export PATH
    command -v cargo-zigbuild >/dev/null ||
        { echo "cargo-zigbuild is not on PATH (looked in $scripts too)" >&2; exit 1; }
}

case "${1:-}" in
    armv6) target=arm-unknown-linux-musleabihf ;;
    armv7) target=armv7-unknown-linux-musleabihf ;;
    setup) setup; echo "arm32 build tools: ziglang $ZIGLANG_VERSION, cargo-zigbuild $CARGO_ZIGBUILD_VERSION, rust-src"; exit 0 ;;
    *) usage ;;
esac
shift

package="-p edge-worker"
for a in "$@"; do
    case "$a" in
        -p | -p* | --package | --package=* | --workspace | --manifest-path | --manifest-path=*) package="" ;;
    esac
done

setup
cd "$(dirname "$0")/.."
echo "building for $target: cargo zigbuild --release $package $*"
# shellcheck disable=SC2086 # $package is one flag and its value, or nothing
RUSTFLAGS="-C link-self-contained=no" RUSTC_BOOTSTRAP=1 \
    cargo zigbuild --release $package --target "$target" -Zbuild-std=std,panic_abort "$@"
