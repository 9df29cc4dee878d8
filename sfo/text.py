"""Prompt encoding (CLIP pooled + T5 sequence), as FLUX does it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sfo.models import FluxModel


@dataclass
class TextEmbeddings:
    """What the FLUX transformer reads of a prompt batch.

    Attributes:
        prompt_embeds: (B, Lt, joint_attention_dim) T5 token embeddings.
        pooled: (B, pooled_projection_dim) CLIP pooled embedding.
        txt_ids: (Lt, 3) position ids of the text tokens (all zero in FLUX).
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def repeat(self, n: int) -> "TextEmbeddings":
        """The batch repeated ``n`` times along dim 0 (``[a, b] -> [a, b, a, b]``)."""
        return TextEmbeddings(self.prompt_embeds.repeat(n, 1, 1), self.pooled.repeat(n, 1), self.txt_ids)

    def select(self, index: torch.Tensor | list[int]) -> "TextEmbeddings":
        index = torch.as_tensor(index, device=self.pooled.device)
        return TextEmbeddings(self.prompt_embeds[index], self.pooled[index], self.txt_ids)


@torch.no_grad()
def encode_prompts(model: FluxModel, prompts: list[str]) -> TextEmbeddings:
    """Encodes prompts with the pipeline's own CLIP and T5 (``FluxPipeline.encode_prompt``)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts: expected a non-empty list of strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}]: expected a string, got {type(prompt).__name__}")
    prompt_embeds, pooled, txt_ids = model.pipe.encode_prompt(
        list(prompts), prompt_2=None, device=model.device, max_sequence_length=model.text_max_length
    )
    dtype = model.transformer.dtype
    return TextEmbeddings(prompt_embeds.to(dtype), pooled.to(dtype), txt_ids.to(dtype))
