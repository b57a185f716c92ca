#!/usr/bin/env bash
# Extraction at the GPU's rate? On a CUDA machine: torchvision ResNet50 (random weights) in bf16, images/s of
# extraction with real JPEG decoding (every CPU a DataLoader worker) and from uint8 arrays through the tensor
# transform, next to the bare forward on random tensors; plus the loader-only figures. Prints a table.
# Usage: scripts/gpu_bench_extract.sh [images] [batch size] [arch]   (defaults 2048, 256, resnet50)
set -euo pipefail
cd "$(dirname "$0")/.."
images="${1:-2048}" batch="${2:-256}" arch="${3:-resnet50}"
out="$(mktemp)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python -m featrec_grid.cli bench extract --pipeline --device cuda \
  --arch "$arch" --precision bf16 --images "$images" --batch-size "$batch" --repeats 2 --json > "$out"
python - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["model"]
rows = [(f"loader only, {w} workers (JPEG 500x375 -> 224)", v) for w, v in r["loader_images_per_s"].items()]
rows += [
    (f"extraction, near-free backbone, {r['extract_workers']} workers", r["extract_images_per_s"]),
    ("tensor transform, CIFAR-shaped uint8 -> 224", r["gpu_transform_images_per_s"]),
    (f"{m['arch']} {m['precision']}: bare forward, random tensors", m["bare_images_per_s"]),
    (f"  extraction, JPEG decoding, {m['workers']} workers", m["extract_jpeg_images_per_s"]),
    ("  extraction, uint8 arrays, tensor transform", m["extract_array_images_per_s"]),
]
print(f"{r['device']}, {r['cpus']} CPUs, batch {r['batch_size']}, {r['images']} JPEGs, {r['array_images']} arrays")
for name, ips in rows:
    print(f"  {name:<62} {ips:>9.0f} images/s")
print(f"  JPEG extraction / bare forward  {100 * m['jpeg_vs_bare']:.0f}%   (goal >= 90%)")
print(f"  array extraction / bare forward {100 * m['array_vs_bare']:.0f}%")
print(f"  tensor path CPU time {r['gpu_transform_cpu_ms_per_image']:.4f} ms/image (goal <= 0.1)")
PY
