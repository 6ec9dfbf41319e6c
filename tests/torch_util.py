"""Helpers for the PyTorch oracle in tests: seeded random weights, numpy state dicts."""

import torch


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (norm weights around 1) so no path is trivially identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module.eval()


def state_dict_np(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}
