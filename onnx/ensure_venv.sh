#!/usr/bin/env bash
# Make sure the pinned export venv (onnx/requirements-export.txt) exists and is current, creating
# or reinstalling it through onnx/export_sd.sh when not; prints its python.
# Used by onnx/make_fixtures.sh and by the benchmark's Python reference pipeline.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${DESKGEN_EXPORT_VENV:-$HOME/.cache/deskgen/venv-export}"
if [[ ! -x "$VENV/bin/python" || ! -f "$VENV/.deskgen-requirements.sha256" ||
      "$(cat "$VENV/.deskgen-requirements.sha256")" != "$(sha256sum "$HERE/requirements-export.txt" | cut -d' ' -f1)" ]]; then
  # export_sd.sh owns the venv; its output goes to stderr so stdout stays the python path.
  bash "$HERE/export_sd.sh" --ensure-venv >&2
fi
echo "$VENV/bin/python"
