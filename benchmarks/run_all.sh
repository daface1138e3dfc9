#!/usr/bin/env bash
# Every benchmark, in the order of benchmarks/README.md. Run from the repository root with the
# venv active, after `make run` (inference and serving use the trained model in models/ and the
# registry's champion).
set -euo pipefail
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db}
python benchmarks/bench_train.py --levers --growth --gpu-slices 16 --epochs 3
python benchmarks/bench_processes.py
python benchmarks/bench_prepare.py --repeat 3
python benchmarks/bench_predict.py --repeat 2
python benchmarks/bench_predict_many.py --scans 8 --rounds 2
python benchmarks/bench_serving.py --model-uri "models:/liver-unet@champion"
python benchmarks/bench_faults_memory.py
