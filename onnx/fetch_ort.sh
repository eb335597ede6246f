#!/usr/bin/env bash
# Fetches ONNX Runtime's shared library from the PyPI wheel (no CDN needed), verifies it, caches it
# under ~/.cache/deskgen/ort/<pkg>-<version>/ and links it at assets/lib/libonnxruntime.so, where
# .cargo/config.toml points ORT_DYLIB_PATH.
#
#   ORT_PKG=onnxruntime      (default, CPU)  |  onnxruntime-gpu (CUDA 13 build, ~255 MB wheel)
#   ORT_VERSION=1.32.0
#
# The GPU package's provider libraries (libonnxruntime_providers_cuda.so and _shared.so) must sit
# next to the core library, where ONNX Runtime looks for them: they are linked into assets/lib too,
# and the script fails when the wheel did not hold them. CUDA 13 and cuDNN 9 themselves are not in
# the wheel (see docs/gpu.md).
set -euo pipefail

pkg=${ORT_PKG:-onnxruntime}
version=${ORT_VERSION:-1.32.0}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${DESKGEN_CACHE:-$HOME/.cache/deskgen}/ort/$pkg-$version
lib=libonnxruntime.so.$version

# Known-good sha256 of the core library, per package and version.
case "$pkg-$version" in
  onnxruntime-1.31.1) want=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3 ;;
  onnxruntime-1.32.0) want=6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f ;;
  *) want="" ;;
esac

if [ ! -f "$cache/$lib" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.12 --implementation cp \
    "$pkg==$version" -d "$tmp"
  mkdir -p "$tmp/x"
  python3 - "$tmp" <<'PY'
import glob, sys, zipfile
tmp = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0])
for name in wheel.namelist():
    if name.startswith("onnxruntime/capi/lib") and ".so" in name:
        with open(f"{tmp}/x/{name.rsplit('/', 1)[1]}", "wb") as out:
            out.write(wheel.read(name))
PY
  if [ -n "$want" ]; then
    got=$(sha256sum "$tmp/x/$lib" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
      echo "fetch_ort: sha256 mismatch for $lib: got $got, want $want" >&2
      exit 1
    fi
  fi
  mkdir -p "$cache"
  mv "$tmp"/x/* "$cache/"
fi

providers=()
if [ "$pkg" = onnxruntime-gpu ]; then
  providers=(libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so)
fi
for p in "${providers[@]}"; do
  if [ ! -s "$cache/$p" ]; then
    echo "fetch_ort: $pkg $version has no $p" >&2
    exit 1
  fi
done

mkdir -p "$root/assets/lib"
# Drop the links of a previously fetched package, so CPU and GPU libraries never mix.
rm -f "$root"/assets/lib/libonnxruntime*
for f in "$cache"/*; do ln -sf "$f" "$root/assets/lib/$(basename "$f")"; done
for p in "${providers[@]}"; do
  [ -e "$root/assets/lib/$p" ] || { echo "fetch_ort: $p not linked next to the core library" >&2; exit 1; }
done
ln -sf "$cache/$lib" "$root/assets/lib/libonnxruntime.so"
echo "ONNX Runtime $pkg $version: $root/assets/lib/libonnxruntime.so"
