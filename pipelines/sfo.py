"""sfo: trains the rank-16 "sfo" LoRA over the frozen "ref" on quadruplets (SFO paper Eq. 3, Sec. 4.1, D.2).

    python -m pipelines.sfo --config pipelines/configs/sfo.yaml [key=value ...]

Variants (paper Table E, ``sfo.variant``): ``sfo`` (default), ``sft-additional`` (the extra LoRA
trained with Eq. 1, negatives unused), ``direct`` (SFO applied to "ref" itself against a frozen
copy). Ray Train TorchTrainer, DeepSpeed ZeRO inside the loop; see ``pipelines.train``.
"""

from __future__ import annotations

import sys

from pipelines.config import parse_job_args
from pipelines.train import main_for
from pipelines.train_config import SfoConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_job_args(SfoConfig, "python -m pipelines.sfo", __doc__, argv)
    return 0 if config is None else main_for(config)


if __name__ == "__main__":
    sys.exit(main())
