#!/usr/bin/env bash
# The demo: a node prefetching a Flox environment from a FloxHub and a binary cache.
#
# Installs what it needs (Debian packages, as root), builds kof, builds the fixture environments
# from real Debian binaries, starts the fixture FloxHub + signed binary cache on loopback (20 ms
# per request, 50 MB/s), prefetches kof/python into a fresh store, and shows resolve and stats.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
[ "$(id -u)" = 0 ] && ./scripts/install-deps.sh
cargo build --release -q -p kof-cli -p kof-fixtures
bin=$root/target/release
fixtures=${KOF_FIXTURES_DIR:-$root/target/kof-fixtures/small}
"$bin/kof-fixtures" build --only small --out "$fixtures"

work=$(mktemp -d /tmp/kof-demo.XXXXXX)
"$bin/kof-fixtures" serve --dir "$fixtures" --latency-ms 20 --bandwidth 50MB >"$work/serve.out" 2>"$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$work/serve.out" && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$work/serve.out")
cat >"$work/config.toml" <<CONF
floxhub_url = "$url/git"
substituters = ["$url/cache/zstd"]
trusted_public_keys = ["$(cat "$fixtures/keys/cache.public")"]
store_dir = "$work/store"
CONF
export KOF_CONFIG=$work/config.toml
echo "== fixture FloxHub and binary cache at $url (20 ms/request, 50 MB/s); config $KOF_CONFIG"
echo
echo "== kof-store prefetch kof/python"
"$bin/kof-store" prefetch kof/python
echo
echo "== kof-store resolve kof/python"
"$bin/kof-store" resolve kof/python
echo
echo "== kof-store resolve kof/rollback --json   (live generation 2, newest 3)"
"$bin/kof-store" resolve kof/rollback --json | head -n 20
echo "  ..."
echo
echo "== kof-store prefetch kof/hello   (shares glibc, bash, ... with kof/python)"
"$bin/kof-store" prefetch kof/hello
echo
echo "== kof-store stats"
"$bin/kof-store" stats
echo
echo "== kof-store verify"
"$bin/kof-store" verify
