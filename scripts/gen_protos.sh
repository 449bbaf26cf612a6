#!/usr/bin/env bash
# Regenerate the Python gRPC code from protos/ (never edit the *_pb2*.py files by hand).
# Usage: scripts/gen_protos.sh [python]   (default: .venv/bin/python)
# protos/cxr/vendor/torchserve/*.proto are TorchServe 0.12's own, copied unchanged from ts/frontend/model-server.jar.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
GOOGLE_PROTOS=$("$PY" -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')
GRPC_PROTOS=$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
PROTOS=(protos/cxr/ingestion/v1/ingestion.proto protos/cxr/vendor/torchserve/inference.proto
        protos/cxr/vendor/torchserve/management.proto)
"$PY" -m grpc_tools.protoc -Iprotos -I"$GRPC_PROTOS" -I"$GOOGLE_PROTOS" \
  --python_out=. --pyi_out=. --grpc_python_out=. "${PROTOS[@]}"
for d in cxr/ingestion cxr/ingestion/v1 cxr/vendor cxr/vendor/torchserve; do
  [[ -f $d/__init__.py ]] || echo '"""Generated gRPC code (scripts/gen_protos.sh); do not edit."""' > "$d/__init__.py"
done
echo "generated: $(ls cxr/ingestion/v1/*_pb2*.py cxr/vendor/torchserve/*_pb2*.py | tr '\n' ' ')"
