"""A bf16 model of WORKERD_BENCH_MODEL_MB MiB, its weights read from WORKERD_BENCH_WEIGHTS.

A load does what a real one does once the checkpoint is in the page cache: map the file, copy
each weight to the device (a pageable host-to-device copy on CUDA), with no random init on the
way (the module is built on the meta device and given empty storage). `write_weights` makes
the file once per benchmark run. Without WORKERD_BENCH_WEIGHTS the weights are generated on the
device instead (cheaper, and on CUDA much faster than any real load).
"""

from __future__ import annotations

import os
from typing import Any

import torch

WIDTH = 4096
LAYER_ELEMENTS = WIDTH * WIDTH


def layer_count() -> int:
    size_mb = float(os.environ.get("WORKERD_BENCH_MODEL_MB", "512"))
    return max(1, int(size_mb * 1024 * 1024 / (LAYER_ELEMENTS * 2)))  # bf16: 2 bytes each


def build(device: str, layers: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = torch.nn.Sequential(
            *(torch.nn.Linear(WIDTH, WIDTH, bias=False, dtype=torch.bfloat16) for _ in range(layers))
        )
    return model.to_empty(device=device)


def write_weights(path: str) -> int:
    """Random weights for layer_count() layers, written layer by layer; returns the bytes."""
    layer = torch.empty(LAYER_ELEMENTS, dtype=torch.bfloat16)
    with open(path, "wb") as handle:
        for _ in range(layer_count()):
            layer.normal_(0, 0.02)
            handle.write(layer.view(torch.int16).numpy().tobytes())
    return layer_count() * LAYER_ELEMENTS * 2


def load(device: str) -> torch.nn.Module:
    layers = layer_count()
    model = build(device, layers)
    path = os.environ.get("WORKERD_BENCH_WEIGHTS")
    with torch.no_grad():
        if path:
            weights = torch.from_file(path, shared=False, size=layers * LAYER_ELEMENTS, dtype=torch.bfloat16)
            for index, parameter in enumerate(model.parameters()):
                start = index * LAYER_ELEMENTS
                parameter.copy_(weights[start : start + LAYER_ELEMENTS].view(WIDTH, WIDTH))
        else:
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
