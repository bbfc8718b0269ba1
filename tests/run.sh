#!/bin/sh
# The README's test command: installs what the tests need (tests/setup.sh),
# then runs every test. Extra arguments go to cargo test.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
sh "$here/setup.sh"
cd "$here/.."
exec cargo test --workspace "$@"
