#!/usr/bin/env bash
# The benchmarks of the README: builds kof and the full fixture set (kof/big, kof/many need the
# extra Debian packages of .ci/apt-packages-bench), then runs kof-bench side by side with the
# real Nix over the fixture link (20 ms per request, 50 MB/s shared): the eager prefetch and dedup
# set (`all`), the lazy cold starts of kof/python and kof/jdk (`coldstart-all`), 20 concurrent
# cold starts through one kof-fetcherd (`concurrent`), cold view preparations of kof/wide (204
# paths), kof/python and kof/jdk (`prepare`) and a 1 GiB sequential read through the view
# (`seqread`). Extra arguments go to `all` and `coldstart-all` (e.g. --runs 5). Results:
# tables on stdout, JSON in target/bench*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] && ./scripts/install-deps.sh --bench
cargo build --release -q -p kof-cli -p kof-fixtures -p kof-benches -p kof-fetcherd
fixtures=${KOF_FIXTURES_FULL:-$PWD/target/kof-fixtures/full}
target/release/kof-fixtures build --out "$fixtures"
bench=target/release/kof-bench
"$bench" --fixtures "$fixtures" --json target/bench.json all "$@"
"$bench" --fixtures "$fixtures" --json target/bench-coldstart.json coldstart-all "$@"
"$bench" --fixtures "$fixtures" --json target/bench-concurrent.json concurrent --env kof/python --starts 20
"$bench" --fixtures "$fixtures" --json target/bench-prepare.json prepare
"$bench" --fixtures "$fixtures" --json target/bench-seqread.json seqread --runs 3
cargo build --release -q -p kof-shim && "$bench" --fixtures "$fixtures" --json target/bench-podstart.json podstart "$@"
