#!/usr/bin/env bash
# `featrec-grid bench cka` on a CUDA machine: ours, pytorch-cka, torch-cka and ckatorch on the same GPU, same
# batches, against the float64 reference computed on the same device. Writes the JSON and the table to $OUT (or
# ./bench_out). Needs the bench extra: pip install -e '.[bench]'.
set -euo pipefail
out="${OUT:-bench_out}"
mkdir -p "$out"
device="${1:-cuda}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python - "$device" "$out" <<'PY'
import json
import sys

from featrec_grid.bench.cka import format_cka_bench, run_cka_bench

device, out = sys.argv[1], sys.argv[2]
result = run_cka_bench(device=device, repeats=3)
with open(f"{out}/bench_cka_{device.replace(':', '_')}.json", "w") as fh:
    json.dump(result, fh, indent=1)
text = format_cka_bench(result)
with open(f"{out}/bench_cka_{device.replace(':', '_')}.txt", "w") as fh:
    fh.write(text + "\n")
print(text)
PY
