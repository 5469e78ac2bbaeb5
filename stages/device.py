"""Where every stage's model runs, and in what precision: one rule for training and inference.

The device is CUDA when torch sees a GPU (the local rank's under torchrun), else the CPU;
`CONSORT_DEVICE=cpu` or `cuda` forces it. `precision: auto` (params.yaml's choice) is bf16 where the device
computes bfloat16 natively and fp32 elsewhere: on a CPU without AVX-512 BF16 or AMX, bf16 is
emulated and far slower than fp32. Training keeps fp32 master weights, matmuls autocast to bf16;
a stage that only scores or generates holds its weights in bf16 itself.
"""
from __future__ import annotations

import os
from functools import cache

import torch

from stages.runtime import in_stage

DEVICE_VARIABLE = "CONSORT_DEVICE"
PRECISIONS = ("auto", "fp32", "bf16")


@cache
def device() -> torch.device:
    """Where this process runs its models: CONSORT_DEVICE if set (cpu or cuda), else its GPU if there is one.
    A pipeline stage says which in its log (benchmarks/gpu_check.sh reads it)."""
    chosen = _device()
    if in_stage():
        print(f"device: {chosen}", flush=True)
    return chosen


def _device() -> torch.device:
    wanted = os.environ.get(DEVICE_VARIABLE, "cuda" if torch.cuda.is_available() else "cpu")
    if wanted not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_VARIABLE}={wanted!r}: use cpu or cuda")
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_VARIABLE}=cuda, but this torch sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                           f"install a CUDA build of torch or unset {DEVICE_VARIABLE}")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def native_bf16() -> bool:
    """Whether this process's device computes bfloat16 natively: a GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX (elsewhere bf16 is emulated: 4-50x slower than fp32 on an AVX2 EPYC, measured 2026-12-07)."""
    if device().type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolved(precision: str) -> str:
    """fp32 or bf16: `auto` is bf16 where the device computes it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return ("bf16" if native_bf16() else "fp32") if precision == "auto" else precision


def autocast(precision: str):
    """Matmuls in bfloat16 where asked (native bf16 runs them about 2x faster); weights, gradients and
    optimizer state stay fp32, so the frozen public half stays bit-identical."""
    return torch.autocast(device().type, dtype=torch.bfloat16, enabled=resolved(precision) == "bf16")


def inference_dtype(precision: str) -> torch.dtype:
    """The dtype a scoring or generating stage holds its weights in."""
    return torch.bfloat16 if resolved(precision) == "bf16" else torch.float32


def for_inference(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model on this process's device, in the inference dtype, in eval mode (in place)."""
    return model.to(device=device(), dtype=inference_dtype(precision)).eval()
