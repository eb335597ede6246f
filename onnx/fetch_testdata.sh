#!/usr/bin/env bash
# Fetches real photographs for the vision tests from Debian's `darknet` package (downloaded and
# unpacked, never installed), checks them against known sha256 sums, caches them under
# ~/.cache/deskgen/testdata/darknet/ and links them at assets/testdata/darknet/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${DESKGEN_CACHE:-$HOME/.cache/deskgen}/testdata/darknet
dest=$root/assets/testdata/darknet

# The images tests rely on, as shipped in darknet 0.0.0+git20180914 (Debian bookworm).
declare -A want=(
  [dog.jpg]=5a9522051c3cec2bbd2f6323fccba32e8fbf3ddcc2b3e2fd46b04c720bc6f866
  [eagle.jpg]=f95f57297fd51a6c5ddceb5ed6916fa759d1d65f402fee34c05b31a9608755c0
  [giraffe.jpg]=00dc48a9b2af8a1fe4c4b79319726591f1033c7e1150f21e7577a79f3b6659f1
  [horses.jpg]=c8f0a677a1356569e2ce71d2fa88c1030c0ae57ecf5e14170e02d9a86a20dcb4
  [kite.jpg]=87410f52f79cc256c3949b48a3548632c07c8e9943468ef8caa6250f6643be8e
  [person.jpg]=cdcbab947e46110fc2b77784ac54ddbbab2640f1e44cb5e91fc8984a9793a7d1
)

cached_ok() {
  for name in "${!want[@]}"; do
    [ -f "$cache/$name" ] || return 1
    [ "$(sha256sum "$cache/$name" | cut -d' ' -f1)" = "${want[$name]}" ] || return 1
  done
}

if ! cached_ok; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # apt-get download writes into the current directory; a stale package list is the usual
  # reason it fails, so refresh the list once and retry.
  if ! (cd "$tmp" && apt-get download darknet >/dev/null 2>&1); then
    echo "fetch_testdata: apt-get download darknet failed; running apt-get update and retrying" >&2
    apt-get update >/dev/null
    (cd "$tmp" && apt-get download darknet >/dev/null) || {
      echo "fetch_testdata: cannot download Debian's darknet package (apt-get download darknet)" >&2
      exit 1
    }
  fi
  dpkg -x "$tmp"/darknet_*.deb "$tmp/x"
  mkdir -p "$cache"
  for name in "${!want[@]}"; do
    src=$tmp/x/usr/share/darknet/data/$name
    if [ ! -f "$src" ]; then
      echo "fetch_testdata: the darknet package has no data/$name" >&2
      exit 1
    fi
    got=$(sha256sum "$src" | cut -d' ' -f1)
    if [ "$got" != "${want[$name]}" ]; then
      echo "fetch_testdata: sha256 mismatch for $name: got $got, want ${want[$name]}" >&2
      exit 1
    fi
    cp "$src" "$cache/$name"
  done
fi

mkdir -p "$dest"
for name in "${!want[@]}"; do ln -sfn "$cache/$name" "$dest/$name"; done
echo "test photos: $dest"
