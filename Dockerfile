# docker build -t sfo-ray:2.60.0-py311-gpu .
# The image every pod in k8s/ runs (head, workers, job submitters). Its tag repeats the base image's
# tag, and k8s/render.py's RAY_VERSION / IMAGE_TAG must agree with it (tests/k8s checks all three).
FROM rayproject/ray:2.60.0-py311-gpu

# The project lives here; k8s RayJobs use it as their runtime_env working_dir (k8s/render.py APP_DIR).
# Created as the base image's user `ray`: a WORKDIR-created folder would be root's, and pip's build
# writes its egg-info next to pyproject.toml.
RUN mkdir -p /home/ray/sfo
WORKDIR /home/ray/sfo

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users sfo ./sfo
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users serving ./serving
COPY --chown=ray:users cluster ./cluster

# torch: no CPU index here. The Makefile installs the CPU wheel first so a laptop never downloads a
# multi-GB CUDA build; in this GPU image we want the opposite. pyproject's torch==2.13.0 resolves on
# PyPI to the Linux x86_64 wheel that is built against CUDA and pulls its nvidia-* runtime wheels,
# which run on the base image's driver stack. Ray itself is already in the base image at 2.60.0 and
# satisfies ray~=2.60.0, so pip keeps it and only adds the extras' dependencies.
RUN pip install --no-cache-dir . \
    && python -c "import torch, ray; assert ray.__version__ == '2.60.0', ray.__version__; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
