#!/usr/bin/env bash
# Source on the offline GPU host from the repo root: installs the carried wheels (.whl, made here by
# `bash ../shared/gpu/prepare_wheels.sh .whl`) into .site and puts the package on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || return 1
export PYTHONPATH=$PWD/.site:$PWD/kernels:$PWD
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
