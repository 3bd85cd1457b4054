#!/usr/bin/env bash
# Reproduce the CPU numbers in docs/benchmarks.md (about 45 minutes on 2 cores), then the plot.
# Results go to docs/bench/<today>/; on a noisy machine raise --steps (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/bench/$(date +%F)
mkdir -p "$out"
run() { local name=$1; shift; fxsd bench "$@" --json "$out/$name.json" | tee "$out/$name.txt"; }
run resnet50_linear resnet50 --batch-size 16 --image-size 64 --steps 30 \
    --drop-rate 0.1 0.3 0.5 0.7 0.9 --distribution linear
run resnet50_uniform resnet50 --batch-size 16 --image-size 64 --steps 30 \
    --drop-rate 0.5 --distribution uniform
run cifar_resnet110_linear cifar_resnet110 --batch-size 32 --steps 40 \
    --drop-rate 0.1 0.3 0.5 0.7 0.9 --distribution linear
run cifar_resnet110_uniform cifar_resnet110 --batch-size 32 --steps 40 \
    --drop-rate 0.5 --distribution uniform
run vit_b_16_sample vit_b_16 --mode sample --image-size 64 --batch-size 16 --steps 15 \
    --drop-rate 0.4 --distribution uniform
run cifar_resnet56_compile_linear cifar_resnet56 --compile --batch-size 32 --steps 20 \
    --drop-rate 0.5 --distribution linear
run cifar_resnet56_compile_uniform cifar_resnet56 --compile --batch-size 32 --steps 20 \
    --drop-rate 0.5 --distribution uniform
run cifar_resnet56_compile_channels_last_linear cifar_resnet56 --compile --channels-last \
    --batch-size 32 --steps 20 --drop-rate 0.5 --distribution linear
run cifar_resnet56_compile_channels_last_uniform cifar_resnet56 --compile --channels-last \
    --batch-size 32 --steps 20 --drop-rate 0.5 --distribution uniform
run vit_b_16_compile_linear vit_b_16 --compile --image-size 64 --batch-size 16 --steps 10 \
    --drop-rate 0.5 --distribution linear
run vit_b_16_compile_uniform vit_b_16 --compile --image-size 64 --batch-size 16 --steps 10 \
    --drop-rate 0.5 --distribution uniform
python docs/bench/compile_strategies.py --steps 12 | tee $out/compile_strategies.txt
fxsd bench --transform --json $out/transform.json | tee $out/transform.txt
python docs/plot_benchmarks.py $out/resnet50_linear.json $out/cifar_resnet110_linear.json \
    -o docs/benchmarks.png
