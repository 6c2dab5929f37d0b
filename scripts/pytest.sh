#!/usr/bin/env bash
# Run pytest from the venv; "no tests collected" (exit 5) is a failure, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests for: $*  (treating as failure)" >&2
  exit 1
fi
exit "$rc"
