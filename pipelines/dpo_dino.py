"""The "dpo-dino" target-pair baseline (SFO paper Table 4, after Diffusion-DPO): two SFT samples per triplet.

The SFT model (base + "ref") generates two images from the *undegraded* condition (reference,
target text) with two seeds; the one with the higher DINO similarity to the reference becomes the
positive (``target_png``) and the other the negative (``negative_png``). The dataset's own target is
not used. Run it as the cdns stage's mode: ``python -m pipelines.cdns ... cdns.mode=dpo-dino``.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from cluster import storage
from pipelines.negatives import DPO_DINO_MODE as DPO_DINO
from pipelines.negatives import SEED_BITS, CdnsConfig, NegativeGenerator, sample_seed


def pick_positive(dino_a: torch.Tensor, dino_b: torch.Tensor) -> torch.Tensor:
    """(N,), (N,) DINO scores of two candidates -> (N,) bool, True where candidate a is the positive.

    Ties go to a (the first seed), so the choice is deterministic.
    """
    return dino_a >= dino_b


def second_seed(seed: int) -> int:
    """The second candidate's seed: the next one, wrapped into [0, 2**31)."""
    return (seed + 1) % (1 << SEED_BITS)


class DpoDinoGenerator(NegativeGenerator):
    """Triplet rows in, quadruplet rows out (positive and negative both generated); the SFT model and
    the DINO encoder are loaded once per instance (= per Ray Data actor)."""

    def __init__(self, config: CdnsConfig, device: str | None = None) -> None:
        from sfo.metrics import Scorer

        super().__init__(config, device)
        encoder = config.cdns.dino_encoder
        if encoder == "tiny":
            self.scorer = Scorer.load(encoder, "tiny", device=self.model.device)
        else:  # a folder: local, or s3:// / gs:// downloaded for the load
            with storage.local_copy(encoder) as folder:
                self.scorer = Scorer.load(str(folder), "tiny", device=self.model.device)

    def __call__(self, batch: dict | pa.Table) -> pa.Table:
        """B triplet rows -> B quadruplet rows; ``target_png`` is replaced by the DINO-preferred sample."""
        from PIL import Image

        from sfo.records import QUADRUPLET_SCHEMA, TRIPLET_SCHEMA, decode_png, encode_png
        from sfo.sampler import generate

        columns = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        side = (self.section.size, self.section.size)
        seeds_a = [sample_seed(self.section.seed, str(r["sample_id"])) for r in rows]
        seeds_b = [second_seed(s) for s in seeds_a]
        references = [decode_png(r["reference_png"]).resize(side, Image.BICUBIC) for r in rows]
        prompts = [str(r["target_text"]) for r in rows]
        with self._adapters():  # candidates a then b, one call: (2B,) images
            images = generate(self.model, prompts * 2, seeds_a + seeds_b, self.sampler, references * 2)
        a, b = images[: len(rows)], images[len(rows):]
        dino_a = torch.stack([self.scorer.dino([x], [r])[0] for x, r in zip(a, references)])  # (B,)
        dino_b = torch.stack([self.scorer.dino([x], [r])[0] for x, r in zip(b, references)])  # (B,)
        a_wins = pick_positive(dino_a, dino_b).tolist()
        out = {f.name: list(columns[f.name]) for f in TRIPLET_SCHEMA}
        out["target_png"] = [encode_png(x if w else y) for x, y, w in zip(a, b, a_wins)]
        s, n = self.section, len(rows)
        out.update({
            "negative_png": [encode_png(y if w else x) for x, y, w in zip(a, b, a_wins)],
            "negative_mode": [DPO_DINO] * n,
            "negative_image_degradation": ["none"] * n,
            "negative_text_degradation": ["none"] * n,
            "negative_blur_radius": [None] * n,
            "negative_noise_std": [None] * n,
            "negative_prompt": prompts,
            "negative_seed": [sb if w else sa for sa, sb, w in zip(seeds_a, seeds_b, a_wins)],
            "negative_steps": [s.steps] * n,
            "negative_guidance": [s.guidance] * n,
            "negative_adapter_sha256": [self.adapter_sha] * n,
        })
        return pa.Table.from_pydict(out, schema=QUADRUPLET_SCHEMA)
