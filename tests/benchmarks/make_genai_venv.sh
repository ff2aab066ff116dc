#!/usr/bin/env bash
# The onnxruntime-genai model builder's own environment (issue 11): the builder needs transformers 5.x, the project
# pins transformers 4.57, so the two never share a venv.
#
#   tests/benchmarks/make_genai_venv.sh [VENV] [MAIN_VENV]   (defaults: $INFERALIGNER_HOME/venv-genai, .venv)
#
# The genai venv holds onnxruntime-genai 0.18.0 and transformers 5.x. torch (2.13.0, CPU) is not installed a second
# time: a .pth file appends the main venv's site-packages *after* the genai venv's own, so `import torch` finds the
# main venv's copy while `import transformers` finds 5.x first.
set -euo pipefail
VENV=${1:-${INFERALIGNER_HOME:-$HOME/.cache/inferaligner-edge}/venv-genai}
MAIN_VENV=${2:-.venv}
PY=${PYTHON:-python3}
MAIN_SITE=$("$MAIN_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "onnxruntime-genai==0.18.0" "transformers>=5,<6" "onnx_ir>=0.1.11" \
    "onnx>=1.18" "onnxruntime>=1.31" safetensors sentencepiece protobuf
GENAI_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$MAIN_SITE" > "$GENAI_SITE/zz_main_venv_torch.pth"
"$VENV/bin/python" - <<'PY'
import onnxruntime_genai, torch, transformers
print(f"genai venv: onnxruntime-genai {onnxruntime_genai.__version__}, transformers {transformers.__version__}, "
      f"torch {torch.__version__}")
PY
