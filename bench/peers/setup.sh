#!/usr/bin/env bash
# The peers' own virtual environment (never a project dependency): LitServe, torch (CPU build).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}" safetensors numpy litserve
fi
.venv/bin/python -c "import litserve, torch; print('litserve', litserve.__version__, 'torch', torch.__version__)"
