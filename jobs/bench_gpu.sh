#!/usr/bin/env bash
# GPU throughput check (docs/benchmarks.md): random-weight BEiT-base/16, EfficientNet-B7 and
# MobileNetV1 at bf16 on one GPU, over real JPEGs (the ImageNet sample repeated REPEAT times).
# No hub access is needed: the checkpoints are built locally with the hub's architecture
# and processor settings.
#
#   jobs/bench_gpu.sh OUT_DIR [SAMPLE_DIR] [REPEAT]
set -euo pipefail
out=${1:?usage: jobs/bench_gpu.sh OUT_DIR [SAMPLE_DIR] [REPEAT]}
sample=${2:-../shared/data/imagenet-sample}
repeat=${3:-10}
[[ -d $sample ]] || { echo "no image folder at $sample" >&2; exit 2; }
mkdir -p "$out"
images=$out/images
if [[ ! -d $images ]]; then
    # Each copy is a tree of symlinks under its own name, so every image keeps a unique id.
    for ((r = 1; r <= repeat; r++)); do
        mkdir -p "$images"
        cp -rs "$(realpath "$sample")" "$images/copy$r"
    done
fi
python -m batch_classify.bench.checkpoints "$out/models"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || rocm-smi --showproductname 2>/dev/null || true
# preset:batch size
for run in beit-base-patch16-224:256 efficientnet-b7:32 mobilenet-v1-1.0-224:256; do
    preset=${run%%:*}
    batch=${run##*:}
    batch-classify bench --model.name "$out/models/$preset" --data.path "$images" --data.kind images \
        --runtime.precision bf16 --runtime.batch_size "$batch" --bench.baseline_limit 2000 \
        --bench.dir "$out/$preset" "${@:4}" 2>&1 | grep -v "^Loading weights" | tail -n 12
done
# The decode-bound case again, its plain JPEGs decoded on the GPU in batches (nvJPEG;
# on ROCm the job says it falls back to the workers)
batch-classify bench --model.name "$out/models/mobilenet-v1-1.0-224" --data.path "$images" \
    --data.kind images --runtime.precision bf16 --runtime.batch_size 256 --runtime.decode device \
    --bench.stages model,pipeline,job --bench.dir "$out/mobilenet-v1-1.0-224-decode-device" "${@:4}" \
    2>&1 | grep -v "^Loading weights" | tail -n 8
