"""DreamBench automatic metrics (SFO paper Sec. 4.1, App. D.3): DINO, CLIP-I and CLIP-T.

- DINO: cosine similarity of DINO ViT-S/16 CLS embeddings, generated image vs each reference
  photo of the subject, averaged over the references.
- CLIP-I: the same with CLIP image embeddings (projected).
- CLIP-T: cosine of the generated image's CLIP image embedding and the target prompt's CLIP text
  embedding.

Encoders come from local folders in the transformers format (``from_pretrained(path,
local_files_only=True)``, with the folder's image processor), or are tiny random encoders built in
code (seeded) for tests and the offline default. Scores from random encoders prove the code path
only: ``Scorer.random_encoders`` is True and every report must say so (``RANDOM_ENCODERS_NOTE``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

try:  # transformers 5: the PIL-backed processors (the default ones need torchvision, absent here)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers import ViTImageProcessorPil as ViTImageProcessor
except ImportError:  # transformers 4.x
    from transformers import CLIPImageProcessor, ViTImageProcessor

TINY = "tiny"
RANDOM_ENCODERS_NOTE = "random encoders: not comparable to published numbers"
RANDOM_MARKER = "sfo_random_encoder.json"  # written beside encoders saved from random weights
# DINO ViT-S/16 (facebook/dino-vits16), the paper's DINO encoder: for a folder of that model.
DINO_VITS16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   patch_size=16, image_size=224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The tiny random encoders: small enough to build in ~0.1 s on a CPU.
TINY_IMAGE_SIZE = 32
TINY_PATCH = 8
TINY_HIDDEN = 32
TINY_CHARS = [chr(c) for c in range(33, 127)]  # CLIP tokenizer: one token per printable character
CLIP_MAX_TOKENS = 77


def tiny_dino(seed: int = 0) -> tuple[ViTModel, ViTImageProcessor]:
    """A DINO-architecture ViT (CLS token, no pooler) with random weights, and its image processor."""
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=TINY_HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=2 * TINY_HIDDEN, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH)
    processor = ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return ViTModel(config, add_pooling_layer=False).eval(), processor


def tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPImageProcessor, CLIPTokenizer]:
    """A CLIP (vision + text towers, projections) with random weights, its image processor and tokenizer."""
    torch.manual_seed(seed)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in TINY_CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                              model_max_length=CLIP_MAX_TOKENS)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_TOKENS,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),  # eos picks the pooled token
        vision_config=dict(hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN, num_hidden_layers=2,
                           num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH),
        projection_dim=TINY_HIDDEN,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                   crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return CLIPModel(config).eval(), processor, tokenizer


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities, in [-1, 1]."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).clamp(-1.0, 1.0)


def mean_reference_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(G, D) generated, (R, D) references of one subject -> (G,) mean cosine over the references."""
    return cosine_matrix(generated, references).mean(dim=1)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (projected pooler_output); 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Scorer:
    """Holds the DINO and CLIP encoders; every method is batched and returns unit-free cosines.

    Args:
        dino, dino_processor: a ViT/DINOv2-style model (CLS token first in ``last_hidden_state``)
            and its image processor.
        clip, clip_processor, clip_tokenizer: a ``CLIPModel`` with its image processor and tokenizer.
        random_encoders: the weights are random (tiny encoders): reports must carry
            ``RANDOM_ENCODERS_NOTE``.
        batch_size: images (or texts) per encoder call.
    """

    def __init__(self, dino, dino_processor, clip, clip_processor, clip_tokenizer, *, random_encoders: bool,
                 device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        self.device = torch.device(device)
        self.dino_model = dino.to(self.device).eval().requires_grad_(False)
        self.clip_model = clip.to(self.device).eval().requires_grad_(False)
        self.dino_processor, self.clip_processor, self.clip_tokenizer = dino_processor, clip_processor, clip_tokenizer
        self.random_encoders = random_encoders
        self.batch_size = batch_size

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> Scorer:
        """Tiny random encoders built in code (no files, no network)."""
        return cls(*tiny_dino(seed), *tiny_clip(seed + 1), random_encoders=True, **kwargs)

    @classmethod
    def load(cls, dino: str | Path = TINY, clip: str | Path = TINY, seed: int = 0, **kwargs) -> Scorer:
        """Each encoder from ``"tiny"`` (random, built in code) or a local folder (e.g. facebook/dino-vits16,
        openai/clip-vit-large-patch14). ``random_encoders`` is set when either is random."""
        for name, folder in (("dino", dino), ("clip", clip)):
            if str(folder) != TINY and not (Path(folder) / "config.json").is_file():
                raise ValueError(f"metrics.{name}: {str(folder)!r} is not a transformers model folder (no config.json)")
        local = dict(local_files_only=True)
        if str(dino) == TINY:
            dino_parts = tiny_dino(seed)
        else:
            dino_parts = (AutoModel.from_pretrained(str(dino), **local), AutoImageProcessor.from_pretrained(str(dino), **local))
        if str(clip) == TINY:
            clip_parts = tiny_clip(seed + 1)
        else:
            clip_parts = (CLIPModel.from_pretrained(str(clip), **local), AutoImageProcessor.from_pretrained(str(clip), **local),
                          AutoTokenizer.from_pretrained(str(clip), **local))
        random = any(str(f) == TINY or (Path(f) / RANDOM_MARKER).is_file() for f in (dino, clip))
        return cls(*dino_parts, *clip_parts, random_encoders=random, **kwargs)

    def save(self, dino_folder: str | Path, clip_folder: str | Path) -> None:
        """Writes both encoders (+ processors, tokenizer) with ``save_pretrained``; marks random weights."""
        self.dino_model.save_pretrained(dino_folder)
        self.dino_processor.save_pretrained(dino_folder)
        self.clip_model.save_pretrained(clip_folder)
        self.clip_processor.save_pretrained(clip_folder)
        self.clip_tokenizer.save_pretrained(clip_folder)
        if self.random_encoders:
            for folder in (dino_folder, clip_folder):
                (Path(folder) / RANDOM_MARKER).write_text(json.dumps({"random_weights": True}))

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image], encoder: str = "dino") -> torch.Tensor:
        """N RGB images -> (N, D) embeddings (not normalised): DINO CLS token or CLIP projected image features."""
        if encoder not in ("dino", "clip"):
            raise ValueError(f"encoder: unknown {encoder!r}; use 'dino' or 'clip'")
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            if encoder == "dino":
                pixels = self.dino_processor(images=batch, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
                hidden = self.dino_model(pixel_values=pixels.to(self.device)).last_hidden_state  # (B, 1 + P, D)
                chunks.append(hidden[:, 0].float().cpu())  # (B, D) CLS
            else:
                pixels = self.clip_processor(images=batch, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
                out = self.clip_model.get_image_features(pixel_values=pixels.to(self.device))
                chunks.append(_features(out).float().cpu())  # (B, D_proj)
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """N prompts -> (N, D_proj) CLIP text embeddings (truncated to the tokenizer's 77 tokens)."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.clip_tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                         max_length=CLIP_MAX_TOKENS, return_tensors="pt")
            out = self.clip_model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device))
            chunks.append(_features(out).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)

    def dino(self, generated: list[Image.Image], references: list[Image.Image]) -> torch.Tensor:
        """(G,) DINO score of each generated image: mean cosine to the subject's R reference images."""
        return mean_reference_similarity(self.embed_images(generated, "dino"), self.embed_images(references, "dino"))

    def clip_i(self, generated: list[Image.Image], references: list[Image.Image]) -> torch.Tensor:
        """(G,) CLIP-I score: mean CLIP image-image cosine to the R references."""
        return mean_reference_similarity(self.embed_images(generated, "clip"), self.embed_images(references, "clip"))

    def clip_t(self, generated: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """(G,) CLIP-T score: cosine of image i and its own prompt ``texts[i]``."""
        if len(generated) != len(texts):
            raise ValueError(f"clip_t: {len(generated)} images but {len(texts)} prompts")
        image, text = self.embed_images(generated, "clip"), self.embed_texts(texts)  # (G, D), (G, D)
        return F.cosine_similarity(image, text, dim=-1).clamp(-1.0, 1.0)

    def pairwise_dino(self, a: list[Image.Image], b: list[Image.Image]) -> torch.Tensor:
        """(N,) DINO cosine of ``a[i]`` and ``b[i]`` (positive vs negative of a pair, paper Fig. 3b)."""
        if len(a) != len(b):
            raise ValueError(f"pairwise_dino: {len(a)} vs {len(b)} images")
        return F.cosine_similarity(self.embed_images(a, "dino"), self.embed_images(b, "dino"), dim=-1).clamp(-1.0, 1.0)
