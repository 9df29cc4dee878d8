"""Fixtures for the serving tests: adapters saved in a tmp folder ("sfo" randomised so it differs from "ref")."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, _hermetic_cache):
    """``<dir>/ref`` and ``<dir>/sfo`` as the training export writes them; "sfo" has random B matrices."""
    from sfo.adapters import REF, REF_RANK, SFO, SFO_RANK, add_lora, save_adapter
    from sfo.models import load_flux

    model = load_flux("tiny", device="cpu")
    add_lora(model.transformer, REF, REF_RANK)
    add_lora(model.transformer, SFO, SFO_RANK)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.transformer.named_parameters():
            if f"lora_B.{SFO}." in name:  # B = 0 at init would make "sfo" a no-op
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("adapters")
    save_adapter(model.transformer, REF, folder / REF)
    save_adapter(model.transformer, SFO, folder / SFO)
    return folder
