#!/bin/sh
# The README's test command: installs what the tests need (tests/setup.sh),
# then runs every test, and the conductor's again on PostgreSQL. Extra
# arguments go to cargo test.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
sh "$here/setup.sh"
cd "$here/.."
cargo test --workspace "$@"
# The conductor's suite once more with its store on PostgreSQL: a server the
# tests start themselves (one per test binary, a database per test).
AEREKOS_TEST_STORE=postgres cargo test -p conductor --tests "$@"
