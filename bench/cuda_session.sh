#!/usr/bin/env bash
# The CUDA checks of one GPU lease, as two device calls of under 5 minutes each (the lease is 15):
#   bash bench/cuda_session.sh 8b    # the cuda-marked tests, then the 8B cases (the goals)
#   bash bench/cuda_session.sh 1b    # the 1B cases
# It uses the machine's own python3 (torch, transformers, peft are there; nothing is installed)
# and writes gpu.txt, tests.log and throughput.jsonl under $OUT (./bench_out without it).
set -uo pipefail
group=${1:?usage: bench/cuda_session.sh 8b|1b}
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers",
transformers.__version__, "peft", peft.__version__)' | tee -a "$out/gpu.txt"
case $group in
  8b) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_bench.py 2>&1 | tee "$out/tests.log"
      cases=8b-4096x2-ckpt,8b-4096x2-mlp,8b-4096x1,8b-4096x8-ckpt,8b-4096x8-mlp ;;
  1b) cases=tiny-64x2-mlp,1b-2048x8,1b-4096x4-ckpt,1b-4096x4 ;;
  *) echo "unknown group $group: 8b or 1b" >&2; exit 2 ;;
esac
python3 bench/train_throughput.py --cases "$cases" --steps 6 --warmup 2 --run-timeout 90 --out "$out/throughput.jsonl"
