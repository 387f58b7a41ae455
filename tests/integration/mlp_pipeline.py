"""A batched pipeline for the batching tests and bench/batching.py: a small MLP on the CPU whose
batched forward is faster per input than one input at a time (one matrix product per layer
instead of one per input), and keyword arguments that make run_batch() misbehave on chosen
inputs.

Each input is {"seed": n} (the input vector is drawn from that seed, so each output can be
checked against the same input run alone), plus, for the tests:
  sleep: seconds the call sleeps (the longest of its inputs');
  fail: the call raises while this input is in it (the split rule's bad input);
  short: the call returns one output too few (a broken run_batch);
  crash: the call aborts the process;
  opaque: this input's output is an object msgpack cannot encode (a tensor, say);
  mark: a file created when the call begins (the batch runs: a test may act now).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

WIDTH = 256


def load(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(WIDTH, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(1024, 16)).to(device).eval()


def vector(seed: int) -> torch.Tensor:
    return torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed))


def run(model: torch.nn.Module, **kwargs: Any) -> dict[str, Any]:
    return run_batch(model, [kwargs])[0]


def run_batch(model: torch.nn.Module, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for given in inputs:
        if given.get("mark"):
            Path(given["mark"]).touch()
    if any(given.get("crash") for given in inputs):
        os.abort()
    time.sleep(max(float(given.get("sleep", 0)) for given in inputs))
    bad = [given["seed"] for given in inputs if given.get("fail")]
    if bad:
        raise ValueError(f"bad input: seed {bad[0]}")
    with torch.inference_mode():
        batch = torch.stack([vector(int(given.get("seed", 0))) for given in inputs])
        out = model(batch.to(next(model.parameters()).device)).cpu()
    outputs = [
        {"seed": given.get("seed", 0), "sum": float(row.sum()), "position": i}
        for i, (given, row) in enumerate(zip(inputs, out, strict=True))
    ]
    for given, output in zip(inputs, outputs, strict=True):
        if given.get("opaque"):
            output["tensor"] = object()
    return outputs[:-1] if any(given.get("short") for given in inputs) else outputs
