"""A pipeline whose weights are generated in code, sized by WORKERD_BENCH_MODEL_MB.

Loading reads nothing from disk: it allocates and fills the weights on the device, which is the
part of a real load that scales with model size once the file is in the page cache.
"""

from __future__ import annotations

import os
from typing import Any

import torch

WIDTH = 4096


def load(device: str) -> torch.nn.Module:
    size_mb = float(os.environ.get("WORKERD_BENCH_MODEL_MB", "512"))
    layers = max(1, int(size_mb * 1024 * 1024 / (WIDTH * WIDTH * 2)))  # bf16 weights
    model = torch.nn.Sequential(
        *(
            torch.nn.Linear(WIDTH, WIDTH, bias=False, device=device, dtype=torch.bfloat16)
            for _ in range(layers)
        )
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model.eval()


def run(model: torch.nn.Module, batch: int = 8) -> dict[str, Any]:
    device = next(model.parameters()).device
    inputs = torch.ones(batch, WIDTH, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        output = model(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"norm": float(output.float().norm())}
