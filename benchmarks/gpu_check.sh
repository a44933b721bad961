#!/usr/bin/env bash
# The GPU paths in a few minutes, on a machine with an NVIDIA GPU and driver:
# CUDA training, ort-cuda FP16, TensorRT FP16 and INT8 engines, the engine record check, and the
# tests marked gpu. Run from the repository root:  bash benchmarks/gpu_check.sh
set -euo pipefail
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e ".[dev,tensorrt]"
export PATH="$PWD/.venv-gpu/bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv
python -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ort', ort.__version__, ort.get_available_providers())"
run=runs/gpu-check
rm -rf "$run"
edgetransfer finetune -q --out "$run" --limit-per-class 60 --mode full --epochs 2 --device cuda
edgetransfer export "$run"
edgetransfer export "$run" --target ort-cuda --precision fp16
edgetransfer export "$run" --target tensorrt --precision fp16 --precision int8 --trt-batch 1 8 32 --max-accuracy-drop 100
edgetransfer predict "$run/model.onnx" calibration/digits/3/*.png --provider cuda --top-k 1 --json | head -20
python -m pytest -q -m gpu tests
