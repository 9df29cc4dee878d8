"""sft: trains the rank-4 "ref" LoRA on triplets with the flow-matching loss (SFO paper Eq. 1, App. D.1).

    python -m pipelines.sft --config pipelines/configs/sft.yaml [key=value ...]

Ray Train TorchTrainer, DeepSpeed ZeRO inside the loop; see ``pipelines.train`` for the layout of
the output folder. Rerunning with the same output.storage_path and output.name resumes.
"""

from __future__ import annotations

import sys

from pipelines.config import parse_job_args
from pipelines.train import main_for
from pipelines.train_config import SftConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_job_args(SftConfig, "python -m pipelines.sft", __doc__, argv)
    return 0 if config is None else main_for(config)


if __name__ == "__main__":
    sys.exit(main())
