#!/usr/bin/env bash
# Reproduce the CPU numbers in docs/benchmarks.md (about 15 minutes on 2 cores), then the plot.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/bench
mkdir -p "$out"
fxsd bench resnet50 --batch-size 16 --image-size 64 --steps 30 \
    --drop-rate 0.1 0.3 0.5 0.7 0.9 --distribution linear --json $out/resnet50_linear.json | tee $out/resnet50_linear.txt
fxsd bench resnet50 --batch-size 16 --image-size 64 --steps 30 \
    --drop-rate 0.5 --distribution uniform --json $out/resnet50_uniform.json | tee $out/resnet50_uniform.txt
fxsd bench cifar_resnet110 --batch-size 32 --steps 30 \
    --drop-rate 0.1 0.3 0.5 0.7 0.9 --distribution linear --json $out/cifar_resnet110_linear.json | tee $out/cifar_resnet110_linear.txt
fxsd bench cifar_resnet110 --batch-size 32 --steps 30 \
    --drop-rate 0.5 --distribution uniform --json $out/cifar_resnet110_uniform.json | tee $out/cifar_resnet110_uniform.txt
fxsd bench --transform --json $out/transform.json | tee $out/transform.txt
python docs/plot_benchmarks.py $out/resnet50_linear.json $out/cifar_resnet110_linear.json \
    -o docs/benchmarks.png
