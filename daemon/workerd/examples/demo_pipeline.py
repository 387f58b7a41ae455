"""The bundled `demo` pipeline: a small torch model built in code, no downloads.

Runs in: the GPU worker (a pipeline).

    workerctl run demo prompt="a cat"

Loading sleeps WORKERD_DEMO_LOAD_S seconds (default 2) to stand in for reading weights from disk,
so a cold run (load + run) and a warm run (run only) are easy to tell apart. The model has about
WORKERD_DEMO_SIZE_MB megabytes of float32 weights (default 16).

torch is imported by the functions, not at the top: the embedded default config names this
pipeline, and an install without the gpu extra must still import it (`workerd --check-config`)
and answer `run demo` with the one line that says what to install.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def load(device: str) -> torch.nn.Module:
    import torch

    time.sleep(float(os.environ.get("WORKERD_DEMO_LOAD_S", "2")))
    size_mb = float(os.environ.get("WORKERD_DEMO_SIZE_MB", "16"))
    width = 512
    layers = max(1, int(size_mb * 1024 * 1024 / (width * width * 4)))
    generator = torch.Generator().manual_seed(0)  # the same weights on every load
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.to(device).eval()


def run(model: torch.nn.Module, prompt: str = "", batch: int = 1) -> dict[str, Any]:
    """Embed the prompt (deterministically) and push it through the model."""
    import torch

    device = next(model.parameters()).device
    width = next(model.parameters()).shape[1]  # the first Linear's in_features
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, width, generator=generator).to(device)
    with torch.inference_mode():
        output = model(inputs)
    return {
        "prompt": prompt,
        "device": str(device),
        "shape": list(output.shape),
        "checksum": round(float(output.float().sum().item()), 4),
    }


def unload(model: torch.nn.Module) -> None:
    """Release the weights now, even if something still holds a reference to the model."""
    import torch

    for parameter in model.parameters():
        parameter.data = torch.empty(0)
