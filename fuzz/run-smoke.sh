#!/bin/sh
# Bounded fuzzing smoke run of every cargo-fuzz target in fuzz/.
#
#   fuzz/run-smoke.sh                      # 20 s per target (CI)
#   FUZZ_SECONDS=600 fuzz/run-smoke.sh     # longer, on demand
#   FUZZ_TARGETS="frame manifest" fuzz/run-smoke.sh
#
# Installs cargo-fuzz if missing, writes seed corpora from the golden
# example frames (fuzz/seed-corpus), then runs each target for FUZZ_SECONDS
# with a 256 MiB malloc limit (a single allocation over it is a failure:
# decoders must allocate a bounded amount). The toolchain is stable, so the
# sanitizer flags cargo-fuzz passes are enabled with RUSTC_BOOTSTRAP=1.
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
seconds=${FUZZ_SECONDS:-20}
targets=${FUZZ_TARGETS:-"frame manifest topic text local_api_request enrolment"}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
cd "$here"

echo "writing seed corpora"
cargo run --quiet --manifest-path seed-corpus/Cargo.toml \
    --target-dir target/seed-corpus -- corpus

# Release code with overflow checks (-a): an arithmetic overflow is a crash.
echo "building the fuzz targets"
cargo fuzz build --release --debug-assertions

for target in $targets; do
    echo "fuzzing $target for ${seconds}s"
    case $target in
        manifest) max_len=66000 ;;          # MAX_MANIFEST_LEN + a little
        local_api_request) max_len=24576 ;; # MAX_HEAD + MAX_BODY
        *) max_len=8192 ;;                  # 2 x MAX_FRAME_LEN
    esac
    mkdir -p "corpus/$target" "artifacts/$target"
    cargo fuzz run --release --debug-assertions "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len="$max_len" \
        -malloc_limit_mb=256 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz smoke passed: $targets"
