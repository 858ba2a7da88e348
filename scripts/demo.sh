#!/usr/bin/env bash
# The demo: a node running a command inside a Flox environment that appears at once and is
# fetched lazily, then the same through the node daemon, then an eager prefetch.
#
# Installs what it needs (Debian packages, as root), builds kof, builds the fixture environments
# from real Debian binaries, starts the fixture FloxHub + signed binary cache on loopback (20 ms
# per request, 50 MB/s; the cache `kof-cache publish` made: signed indexes, seekable zstd NARs),
# runs python from kof/python in a fresh store with `kof-store run` (prefetch off, so only the
# verified chunks python reads are fetched), starts kof-fetcherd and runs through it,
# then runs containers in environments with a private containerd and the kof shim
# (`ctr run --runtime io.containerd.flox.v2`), then prefetches and shows resolve, stats and verify.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
[ "$(id -u)" = 0 ] && ./scripts/install-deps.sh
cargo build --release -q -p kof-cli -p kof-fixtures -p kof-fetcherd -p kof-shim
bin=$root/target/release
fixtures=${KOF_FIXTURES_DIR:-$root/target/kof-fixtures/small}
"$bin/kof-fixtures" build --only small --out "$fixtures"

work=$(mktemp -d /tmp/kof-demo.XXXXXX)
"$bin/kof-fixtures" serve --dir "$fixtures" --latency-ms 20 --bandwidth 50MB >"$work/serve.out" 2>"$work/serve.log" &
server=$!
daemon=
containerd=
cleanup() {
  if [ -n "$containerd" ]; then
    ctr -a "$work/containerd/sock" -n kof-demo tasks ls -q 2>/dev/null | xargs -r -n1 ctr -a "$work/containerd/sock" -n kof-demo tasks kill -s KILL 2>/dev/null || true
    kill "$containerd" 2>/dev/null; wait "$containerd" 2>/dev/null || true
    rmdir /run/containerd/runc/kof-demo 2>/dev/null || true   # runc's state dir for the namespace
  fi
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
substituters = ["$url/cache/published"]
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
echo "== kof-store run kof/python -- python3 -c ...   (fresh store; the view appears at once, files are fetched as python reads them, each chunk verified against the signed index first)"
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
echo "== containerd with the kof shim: ctr run --runtime io.containerd.flox.v2 --annotation flox.dev/environment=..."
mkdir -p "$work/containerd/bin" "$work/empty-rootfs"
ln -s "$bin/containerd-shim-flox-v2" "$work/containerd/bin/"
touch "$work/empty-rootfs/.flox-empty"   # the whole image: a placeholder, as flox/empty is
cat >"$work/containerd/config.toml" <<CONF
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd/sock"
CONF
PATH="$work/containerd/bin:$PATH" containerd --config "$work/containerd/config.toml" >"$work/containerd.log" 2>&1 &
containerd=$!
for _ in $(seq 100); do ctr -a "$work/containerd/sock" version >/dev/null 2>&1 && break; sleep 0.1; done
flox_ctr() {
  local id=$1 env=$2; shift 2
  ctr -a "$work/containerd/sock" -n kof-demo run --rm --runtime io.containerd.flox.v2 \
    --annotation "flox.dev/environment=$env" --rootfs "$work/empty-rootfs" "$id" "$@"
}
echo "-- kof/python, the command run activated in its environment (vars, hook, FLOX_ENV):"
flox_ctr demo-python kof/python sh -c 'echo "FLOX_ENV=$FLOX_ENV KOF_GREETING=$KOF_GREETING"; python3 -c "import sys; print(\"python\", sys.version.split()[0])"'
echo "-- kof/rollback (live generation 2 has no jq), then pinned to generation 3:"
flox_ctr demo-rb kof/rollback sh -c 'jq --version 2>&1 || echo "no jq in the live generation"'
flox_ctr demo-rb3 kof/rollback:3 jq --version
echo "-- an unknown environment: the container's creation fails, naming it and the cause:"
flox_ctr demo-nope kof/nope true 2>&1 | sed 's/^/   /' || true
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
