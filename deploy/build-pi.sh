#!/bin/sh
# Builds the agent for a Raspberry Pi, static (musl), with std compiled to fit
# it (see "Why std is built here" below):
#
#   sh deploy/build-pi.sh aarch64 [cargo args]   # Pi 3, 4, 5, Zero 2 W, 64-bit OS: aarch64-unknown-linux-musl
#   sh deploy/build-pi.sh armv7 [cargo args]     # Pi 2, 3, 4 on 32-bit: armv7-unknown-linux-musleabihf
#   sh deploy/build-pi.sh armv6 [cargo args]     # Pi 1, Zero, Zero W: arm-unknown-linux-musleabihf
#   sh deploy/build-pi.sh setup [aarch64|armv7|armv6]   # only install the tools (all targets' by default)
#
# The cargo args default to `-p edge-worker`; `--release` is always given.
# `armv6 --no-default-features` builds the agent without TLS,
# `armv7 -p aerekos-test-service` another package. The binary lands in
# target/<triple>/release/ (or under $CARGO_TARGET_DIR, or `--target-dir`).
#
# Why std is built here: rustup's prebuilt std carries backtrace
# symbolization (gimli, addr2line, object, miniz_oxide, rustc_demangle: about
# 200 KiB in the agent) and unwinding. The agent can use neither: it is built
# with panic = "abort" (nothing unwinds) and stripped (no symbols to resolve).
# `-Zbuild-std=std,panic_abort -Zbuild-std-features=` compiles std from the
# rust-src component without any of its optional features, which drops both
# (aarch64 with TLS: -256 KiB). A panic still prints its message and location
# (`thread 'main' panicked at src/x.rs:1:2:` and the message), then aborts;
# only RUST_BACKTRACE has nothing to print. -Zbuild-std is allowed on stable
# by RUSTC_BOOTSTRAP=1. The plain, nightly-flag-free route still works for
# aarch64 (`cargo pi`, about 256 KiB larger); CI budgets this one.
#
# aarch64 links with rustc's rust-lld and the rustup target's musl objects
# (.cargo/config.toml): it needs the rust-src component and
# `rustup target add aarch64-unknown-linux-musl`, no Zig.
#
# armv6/armv7: rustup ships no std for these two targets here, so std is
# compiled from source anyway, and `cargo zigbuild` links with Zig's bundled
# musl (link-self-contained=no: rustc has no musl objects of its own for
# them). Zig also compiles ring's C for the TLS build. ziglang and
# cargo-zigbuild come from PyPI at the versions pinned here and are installed
# when missing or at another version. With `cross` (and its images) a larger
# binary (std with its default features) builds as
#   cross build --release -p edge-worker --target arm-unknown-linux-musleabihf
set -eu

ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1

usage() {
    echo "usage: sh deploy/build-pi.sh <aarch64|armv7|armv6|setup> [cargo args]" >&2
    exit 2
}

setup_rust_src() {
    if ! rustup component list --installed | grep -q '^rust-src'; then
        rustup component add rust-src
    fi
}

setup_aarch64() {
    setup_rust_src
    if ! rustup target list --installed | grep -qx aarch64-unknown-linux-musl; then
        rustup target add aarch64-unknown-linux-musl
    fi
}

setup_arm32() {
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
    setup_rust_src
    # pip puts cargo-zigbuild next to python3's other scripts, which need not
    # be on PATH (cargo finds `cargo zigbuild` there).
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    PATH="$PATH:$scripts"
    export PATH
    command -v cargo-zigbuild >/dev/null ||
        { echo "cargo-zigbuild is not on PATH (looked in $scripts too)" >&2; exit 1; }
}

case "${1:-}" in
    aarch64) target=aarch64-unknown-linux-musl ;;
    armv7) target=armv7-unknown-linux-musleabihf ;;
    armv6) target=arm-unknown-linux-musleabihf ;;
    setup)
        case "${2:-}" in
            aarch64) setup_aarch64; echo "aarch64 build tools: rust-src, the aarch64-unknown-linux-musl target" ;;
            armv6 | armv7) setup_arm32; echo "32-bit build tools: ziglang $ZIGLANG_VERSION, cargo-zigbuild $CARGO_ZIGBUILD_VERSION, rust-src" ;;
            "") setup_aarch64; setup_arm32; echo "Pi build tools: rust-src, the aarch64-unknown-linux-musl target, ziglang $ZIGLANG_VERSION, cargo-zigbuild $CARGO_ZIGBUILD_VERSION" ;;
            *) usage ;;
        esac
        exit 0 ;;
    *) usage ;;
esac
shift

package="-p edge-worker"
for a in "$@"; do
    case "$a" in
        -p | -p* | --package | --package=* | --workspace | --manifest-path | --manifest-path=*) package="" ;;
    esac
done

cd "$(dirname "$0")/.."
# std with none of its optional features (see above), and panic_abort to
# match the release profile.
std="-Zbuild-std=std,panic_abort -Zbuild-std-features="
if [ "$target" = aarch64-unknown-linux-musl ]; then
    setup_aarch64
    echo "building for $target: cargo build --release $package $*"
    # RUSTFLAGS stays unset: it would replace .cargo/config.toml's
    # rustflags for this target (--icf=all, --no-eh-frame-hdr).
    # shellcheck disable=SC2086 # $package is one flag and its value, or nothing; $std two flags
    RUSTC_BOOTSTRAP=1 cargo build --release $package --target "$target" $std "$@"
else
    setup_arm32
    echo "building for $target: cargo zigbuild --release $package $*"
    # Zig must compile ring's C for exactly this CPU (ARMv6 for the Pi Zero:
    # clang's default for these triples emits ARMv7 instructions, a SIGILL at
    # the first TLS handshake on an ARM1176). cargo-zigbuild keeps a C
    # compiler already named for the target, and a cargo-run process (a
    # test rebuilding the agent) inherits .cargo/config.toml's `clang` one:
    # unset, cargo-zigbuild names Zig's, which [env] does not override.
    unset CC_arm_unknown_linux_musleabihf CFLAGS_arm_unknown_linux_musleabihf \
        CC_armv7_unknown_linux_musleabihf CFLAGS_armv7_unknown_linux_musleabihf
    # shellcheck disable=SC2086 # as above
    RUSTFLAGS="-C link-self-contained=no" RUSTC_BOOTSTRAP=1 \
        cargo zigbuild --release $package --target "$target" $std "$@"
fi
