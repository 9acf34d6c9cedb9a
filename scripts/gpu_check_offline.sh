#!/bin/sh
# `make gpu-check WHEELS=DIR` on a GPU machine without network (docs/gpu.md): DeepSpeed and the data
# packages from a folder of wheels into a scratch target, this checkout as an editable install
# without dependencies (setuptools and wheel must be there: they are wherever PyTorch is), then
# `pathways-mm bench gpu-check`. Usage: scripts/gpu_check_offline.sh WHEELS_DIR [OUT_DIR [ARGS...]]
set -e
wheels=${1:?give the folder of wheels (docs/gpu.md)}
out=${2:-runs/gpu_check}
[ $# -ge 2 ] && shift 2 || shift $#
py=${PYTHON:-python3}
site=${GPU_SITE:-/tmp/pmm-site}
$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
$py -m pip install -q --no-index --no-deps --no-build-isolation -e .
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" exec $py -m pathways_mm.cli bench gpu-check --out "$out" "$@"
