#!/usr/bin/env bash
# Fetches the newer containerd releases the tests run against, without installing anything
# system-wide: Debian trixie's containerd (1.7.x) and Debian sid's (2.1.x), from the Debian
# mirror the machine's apt already uses (the one /etc/apt/sources.list.d/debian.sources names).
#
# For each suite, apt runs with a private sources list naming that suite, its own lists
# (Dir::State::Lists), its own caches (Dir::Cache) and no preferences, so the system's apt state
# is neither read for candidates nor written. `apt-get download containerd` fetches the .deb and
# `dpkg -x` unpacks it. The layout (kof-harness and other scripts rely on it):
#
#   target/containerd/<suite>/root/usr/bin/{containerd,ctr,containerd-shim-runc-v2}
#   target/containerd/<suite>/VERSION    the package version; written last, the "done" stamp
#
# Idempotent: a suite whose VERSION exists is skipped. When the archive cannot be reached, it
# says so loudly (the tests against that release will be skipped) and exits 0; any other failure
# exits non-zero. Debian 12's runc is kept: these suites' runc needs a newer glibc.
#
# Usage: scripts/fetch-containerd.sh [SUITE...]   (default: trixie sid)
# Environment: KOF_CONTAINERD_DIR (default target/containerd), KOF_DEBIAN_MIRROR (default: the
# system's mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
out_root="${KOF_CONTAINERD_DIR:-$PWD/target/containerd}"
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(trixie sid)
system_sources=/etc/apt/sources.list.d/debian.sources

# The mirror and keyring of the stanza that serves the system's own (non-security) suite.
mirror=$(awk '
  /^URIs:/ { uri = $2 }
  /^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /-security$/ && $i !~ /-/) main = 1 }
  /^Signed-By:/ { key = $2 }
  /^[[:space:]]*$/ { if (main && uri != "" && !done) { print uri " " key; done = 1 } uri = ""; key = ""; main = 0 }
  END { if (main && uri != "" && !done) print uri " " key }
' "$system_sources")
mirror_uri=${KOF_DEBIAN_MIRROR:-${mirror%% *}}
mirror_key=${mirror#* }
if [ -z "$mirror_uri" ]; then
  echo "fetch-containerd: no Debian mirror found in $system_sources" >&2
  exit 1
fi
[ -n "$mirror_key" ] && [ "$mirror_key" != "$mirror" ] || mirror_key=/usr/share/keyrings/debian-archive-keyring.gpg
arch=$(dpkg --print-architecture)

# Loud, multi-line: the tests against this release will not run.
skip() {
  local suite=$1 why=$2
  {
    echo "################################################################################"
    echo "## containerd $suite could not be fetched: the Debian archive ($mirror_uri)"
    echo "## is not reachable ($why)."
    echo "## Tests against containerd $suite will be SKIPPED."
    echo "## Retry with: scripts/fetch-containerd.sh $suite"
    echo "################################################################################"
  } >&2
}

# True when apt's output says the network, not the request, failed.
unreachable() {
  grep -qiE "could not resolve|temporary failure (in name resolution|resolving)|could not connect|unable to connect|connection (failed|refused|timed out)|network is unreachable|no route to host|timed out" "$1"
}

# Called as `fetch_suite S || status=1`, where bash ignores `set -e`: every step checks itself.
fetch_suite() {
  local suite=$1
  local dir="$out_root/$suite"
  if [ -s "$dir/VERSION" ]; then
    echo "containerd $suite: $(cat "$dir/VERSION") (already fetched, $dir)"
    return 0
  fi
  local work="$dir/apt"
  rm -rf "$work" "$dir/root" "$dir/deb" || return 1
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$dir/deb" || return 1
  # The private sources list: the system's mirror, the other suite.
  echo "deb [signed-by=$mirror_key] $mirror_uri $suite main" >"$work/sources.list" || return 1
  : >"$work/preferences" || return 1
  local apt_opts=(
    -o "Dir::Etc::sourcelist=$work/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::Etc::preferences=$work/preferences"
    -o "Dir::Etc::preferencesparts=-"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "Dir::Cache::pkgcache=$work/cache/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$work/cache/srcpkgcache.bin"
    -o "Dir::Cache::archives=$work/cache/archives"
    -o "APT::Architectures=$arch"
    -o "Acquire::Languages=none"
    -o "Acquire::Retries=2"
    -o "Acquire::http::Timeout=30"
  )
  local log="$work/apt.log"
  echo "containerd $suite: apt-get update ($mirror_uri $suite)"
  if ! apt-get "${apt_opts[@]}" -q update >"$log" 2>&1 || grep -qE '^(E|W): (Failed to fetch|Some index files)' "$log"; then
    if unreachable "$log"; then
      skip "$suite" "$(grep -m1 -iE "failed to fetch|could not|unable|timed out|unreachable|no route" "$log" | sed "s/^[EW]: //")"
      return 0
    fi
    echo "containerd $suite: apt-get update failed:" >&2
    cat "$log" >&2
    return 1
  fi
  echo "containerd $suite: apt-get download containerd"
  if ! (cd "$dir/deb" && apt-get "${apt_opts[@]}" -q download containerd) >"$log" 2>&1; then
    if unreachable "$log"; then
      skip "$suite" "$(grep -m1 -iE "failed to fetch|could not|unable|timed out|unreachable|no route" "$log" | sed "s/^[EW]: //")"
      return 0
    fi
    echo "containerd $suite: apt-get download containerd failed:" >&2
    cat "$log" >&2
    return 1
  fi
  local deb
  deb=$(find "$dir/deb" -maxdepth 1 -name 'containerd_*.deb' | head -1)
  [ -n "$deb" ] || { echo "containerd $suite: no containerd .deb after download" >&2; return 1; }
  local version
  version=$(dpkg-deb -f "$deb" Version) && [ -n "$version" ] || {
    echo "containerd $suite: no Version in $deb" >&2
    return 1
  }
  dpkg -x "$deb" "$dir/root" || return 1
  local bin
  for bin in containerd ctr containerd-shim-runc-v2; do
    if [ ! -x "$dir/root/usr/bin/$bin" ]; then
      echo "containerd $suite: $deb has no usr/bin/$bin" >&2
      return 1
    fi
    # Each binary must run here (they need glibc >= 2.34). The shim takes -v, not --version.
    local flag=--version
    [ "$bin" != containerd-shim-runc-v2 ] || flag=-v
    if ! "$dir/root/usr/bin/$bin" "$flag" >"$work/version.log" 2>&1; then
      echo "containerd $suite: $dir/root/usr/bin/$bin $flag failed:" >&2
      cat "$work/version.log" >&2
      return 1
    fi
    echo "containerd $suite: $bin: $(tr -s '\n ' ' ' <"$work/version.log")"
  done
  # The .deb and the suite's package lists are only needed to get here (30 MB a suite).
  rm -rf "$dir/deb" "$work/cache" "$work/lists"
  # The stamp, last: the binaries are in place.
  echo "$version" >"$dir/VERSION.tmp" && mv "$dir/VERSION.tmp" "$dir/VERSION" || return 1
  echo "containerd $suite: $version fetched into $dir/root"
}

status=0
for suite in "${suites[@]}"; do
  fetch_suite "$suite" || status=1
done
exit "$status"
