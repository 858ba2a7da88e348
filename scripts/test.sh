#!/usr/bin/env bash
# The test command: builds the small fixture set (real Debian binaries made into store paths,
# signed caches, floxmeta repositories) once, then runs every test of the workspace, and closes
# with one line totalling them.
set -euo pipefail
cd "$(dirname "$0")/.."
export KOF_FIXTURES_DIR="${KOF_FIXTURES_DIR:-$PWD/target/kof-fixtures/small}"
cargo build --workspace --all-targets
cargo run -q -p kof-fixtures -- build --only small --out "$KOF_FIXTURES_DIR"
# The newer containerd releases the ctr and CRI tests also run against (Debian trixie's 1.7.x
# and sid's 2.1.x, unpacked under target/containerd, nothing installed); when the archive cannot
# be reached it says so loudly and the tests against them are skipped.
./scripts/fetch-containerd.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# Every `test result:` line of every test binary, summed.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
