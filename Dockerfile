# make image   (= docker build -t sfo-ray:2.60.0-py311-cu128 .)
# The image every pod in k8s/ runs (head, workers, job submitters, the weights Job). Its tag repeats the
# base image's tag; k8s/spec.py's RAY_VERSION / CUDA / IMAGE_TAG, the Makefile's IMAGE and pyproject's
# pins must agree with the ARGs and pins below (tests/k8s/test_image.py checks all of them).
#
# CUDA: one ARG names both the base image's CUDA and the PyTorch wheel index, so they cannot drift. cu128
# (CUDA 12.8) runs on the NVIDIA drivers GKE and EKS install on H100 nodes (>= 525 with CUDA's minor-version
# compatibility; 570+ for every feature). Another CUDA: change CUDA here and in k8s/spec.py together.
ARG RAY_VERSION=2.60.0
ARG CUDA=cu128
FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA}
ARG RAY_VERSION
ARG CUDA
ARG TORCH_VERSION=2.13.0

# k8s/spec.py's RAY_UID:RAY_GID: the weights Job chowns the volume's folders to them.
RUN test "$(id -u):$(id -g)" = "1000:100"

# The project lives here; k8s RayJobs use it as their runtime_env working_dir (k8s/spec.py APP_DIR).
# Created as the base image's user `ray`: a WORKDIR-created folder would be root's, and pip's build
# writes its egg-info next to pyproject.toml.
RUN mkdir -p /home/ray/sfo
WORKDIR /home/ray/sfo

# torch first, from PyTorch's own index for this CUDA: PyPI's torch wheel is built for the one CUDA version
# PyTorch chose for that release, which need not be the base image's. torch==2.13.0 below (pyproject's pin)
# is then satisfied by 2.13.0+cu128 and pip keeps it.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA}"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users sfo ./sfo
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users serving ./serving
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users experiments ./experiments
COPY --chown=ray:users benchmarks ./benchmarks

# The project and the versions this project is tested with (= pyproject's pins). Ray is already in the base
# image at RAY_VERSION and satisfies the pin, so pip keeps it and adds the extras. deepspeed installs from its
# sdist with no ops pre-built (DS_BUILD_OPS unset): the jobs use no DeepSpeed CUDA kernels of their own.
RUN pip install --no-cache-dir . \
        "torch==2.13.0" "ray[default,train,data,serve]==2.60.0" "diffusers==0.42.1" "peft==0.21.2" \
        "deepspeed==0.19.8" "transformers==5.23.0" \
    && python -c "from importlib.metadata import version as v; import torch; \
want = {'ray': '${RAY_VERSION}', 'diffusers': '0.42.1', 'peft': '0.21.2', 'deepspeed': '0.19.8', 'transformers': '5.23.0'}; \
got = {k: v(k) for k in want}; assert got == want, (got, want); \
assert torch.__version__ == '${TORCH_VERSION}+${CUDA}', torch.__version__; \
assert torch.version.cuda.replace('.', '') == '${CUDA}'[2:], torch.version.cuda; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, got)"
