#!/usr/bin/env bash
# The benchmarks of the README: builds kof and the full fixture set (kof/big, kof/many need the
# extra Debian packages of .ci/apt-packages-bench), then runs kof-bench side by side with the
# real Nix over the fixture link (20 ms per request, 50 MB/s shared). Extra arguments go to
# `kof-bench all` (e.g. --runs 5). Results: a table on stdout, JSON in target/bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] && ./scripts/install-deps.sh --bench
cargo build --release -q -p kof-cli -p kof-fixtures -p kof-benches
fixtures=${KOF_FIXTURES_FULL:-$PWD/target/kof-fixtures/full}
target/release/kof-fixtures build --out "$fixtures"
exec target/release/kof-bench --fixtures "$fixtures" --json target/bench.json all "$@"
