import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised branches would make tests vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 1 and scale < 0 else 0.0))
    return module


@pytest.fixture(scope="session")
def tiny_nets():
    """The ``tiny`` preset of every registered family, with random weights."""
    from search_spaces import build_supernet, list_families

    return {fam: randomize_(build_supernet(fam, "tiny"), seed=i) for i, fam in enumerate(list_families())}
