#!/usr/bin/env bash
# Generate node_agent/zds_pb2.py(.pyi) from node_agent/zds.proto with grpcio-tools.
# Idempotent and fast: files are rewritten only when their content changes. The generated files
# are also committed (tests/unit/test_zds_proto.py fails when they are stale), so a checkout
# imports them even before setup has run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=python3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$py" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" node_agent/zds.proto
for f in zds_pb2.py zds_pb2.pyi; do
  cmp -s "$out/node_agent/$f" "node_agent/$f" || cp "$out/node_agent/$f" "node_agent/$f"
done
