"""The device rule every model stage follows: CUDA when there is one, CONSORT_DEVICE to force it."""
import pytest
import torch

from stages import device as D


@pytest.fixture
def rule(monkeypatch):
    """The rule read afresh (device() is cached per process), with CONSORT_DEVICE as each test sets it."""
    monkeypatch.delenv(D.DEVICE_VARIABLE, raising=False)
    D.device.cache_clear()
    yield monkeypatch
    D.device.cache_clear()


def test_the_rule_picks_the_gpu_when_there_is_one_and_honours_consort_device(rule):
    assert D.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    rule.setenv(D.DEVICE_VARIABLE, "cpu")
    D.device.cache_clear()
    assert D.device() == torch.device("cpu")
    native = torch.cpu.get_capabilities()["avx512_bf16"] or torch.cpu.get_capabilities()["amx_bf16"]
    assert D.resolved("auto") == ("bf16" if native else "fp32")  # bf16 only where it is not emulated
    assert D.inference_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert D.inference_dtype("bf16") == torch.bfloat16 and D.inference_dtype("fp32") == torch.float32
    model = D.for_inference(torch.nn.Linear(2, 2).train(), "bf16")
    assert model.weight.dtype == torch.bfloat16 and model.weight.device.type == "cpu" and not model.training


def test_a_bad_device_or_precision_is_named(rule):
    rule.setenv(D.DEVICE_VARIABLE, "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CONSORT_DEVICE=cuda, but this torch sees no CUDA device"):
            D.device()
    rule.setenv(D.DEVICE_VARIABLE, "tpu")
    D.device.cache_clear()
    with pytest.raises(ValueError, match="CONSORT_DEVICE='tpu': use cpu or cuda"):
        D.device()
    rule.setenv(D.DEVICE_VARIABLE, "cpu")
    D.device.cache_clear()
    with pytest.raises(ValueError, match="precision 'fp16': use one of auto, fp32, bf16"):
        D.inference_dtype("fp16")
