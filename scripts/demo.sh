#!/usr/bin/env bash
# The demo: a node running a command inside a Flox environment that appears at once and is
# fetched lazily, then the same through the node daemon, then an eager prefetch.
#
# Installs what it needs (Debian packages, as root), builds kof, builds the fixture environments
# from real Debian binaries, starts the fixture FloxHub + signed binary cache on loopback (20 ms
# per request, 50 MB/s), runs python from kof/python in a fresh store with `kof-store run`
# (prefetch off, so only what python reads is fetched), starts kof-fetcherd and runs through it,
# then prefetches and shows resolve, stats and verify.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
[ "$(id -u)" = 0 ] && ./scripts/install-deps.sh
cargo build --release -q -p kof-cli -p kof-fixtures -p kof-fetcherd
bin=$root/target/release
fixtures=${KOF_FIXTURES_DIR:-$root/target/kof-fixtures/small}
"$bin/kof-fixtures" build --only small --out "$fixtures"

work=$(mktemp -d /tmp/kof-demo.XXXXXX)
"$bin/kof-fixtures" serve --dir "$fixtures" --latency-ms 20 --bandwidth 50MB >"$work/serve.out" 2>"$work/serve.log" &
server=$!
daemon=
cleanup() {
  if [ -n "$daemon" ]; then
    kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null || true
    "$bin/kof-fetcherd" stop-fuse-server 2>/dev/null || true
  fi
  kill $server 2>/dev/null; wait $server 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do grep -q listening "$work/serve.out" && break; sleep 0.1; done
# Bytes the fixture server sent so far, and the kof/python closure's NAR size.
stats_bytes() { python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1]))["bytes_sent"])' "$url/_stats" 2>/dev/null || echo 0; }
closure_mb() { python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); e=[e for e in m["environments"] if e["name"]=="python"][0]; print(e["generations"][-1]["closure_nar_size"]//1000000)' "$fixtures/fixtures.json"; }
url=$(sed -n 's/^listening on //p' "$work/serve.out")
cat >"$work/config.toml" <<CONF
floxhub_url = "$url/git"
substituters = ["$url/cache/none"]
trusted_public_keys = ["$(cat "$fixtures/keys/cache.public")"]
store_dir = "$work/store"
prefetch = "none"
socket = "$work/run/fetcherd.sock"
mount_dir = "$work/mnt"
metrics_addr = "127.0.0.1:0"
CONF
export KOF_CONFIG=$work/config.toml
echo "== fixture FloxHub and binary cache at $url (20 ms/request, 50 MB/s); config $KOF_CONFIG"
echo
py='import json, sqlite3, sys; print("python", sys.version.split()[0], "ran in", sys.prefix)'
echo "== kof-store run kof/python -- python3 -c ...   (fresh store; the view appears at once, files are fetched as python reads them)"
before=$(stats_bytes)
"$bin/kof-store" run kof/python -- python3 -c "$py"
echo "   fetched $(( ($(stats_bytes) - before) / 1000000 )) MB of the closure's $(closure_mb) MB"
echo
echo "== the same environment again: its activation ([vars], hook, FLOX_ENV) and a view of only its closure"
"$bin/kof-store" run kof/python -- sh -c 'echo "FLOX_ENV=$FLOX_ENV"; echo "KOF_GREETING=$KOF_GREETING"; echo "store paths visible: $(ls /nix/store | wc -l)"'
echo
echo "== kof-fetcherd: the node daemon; kof-store run goes through it when it answers"
"$bin/kof-fetcherd" >"$work/fetcherd.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do [ -S "$work/run/fetcherd.sock" ] && break; sleep 0.1; done
"$bin/kof-store" run kof/tools -- jq --version
echo
echo "== kof-store prefetch kof/python   (eager: the rest of the closure)"
"$bin/kof-store" prefetch kof/python
echo
echo "== kof-store resolve kof/python"
"$bin/kof-store" resolve kof/python
echo
echo "== kof-store resolve kof/rollback --json   (live generation 2, newest 3)"
"$bin/kof-store" resolve kof/rollback --json >"$work/rollback.json"
head -n 20 "$work/rollback.json"
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
