#!/usr/bin/env bash
# The test command: builds the small fixture set (real Debian binaries made into store paths,
# signed caches, floxmeta repositories) once, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
export KOF_FIXTURES_DIR="${KOF_FIXTURES_DIR:-$PWD/target/kof-fixtures/small}"
cargo build --workspace --all-targets
cargo run -q -p kof-fixtures -- build --only small --out "$KOF_FIXTURES_DIR"
cargo test --workspace --no-fail-fast
