"""One table of weight dtype names: the config's long names, the converters' short ones, torch's."""
import pytest
import torch

from megavrl.dtypes import dtype_name, resolve_dtype, short_dtype_name, torch_dtype


@pytest.mark.parametrize("long, short, dtype", [("float32", "fp32", torch.float32),
                                                ("bfloat16", "bf16", torch.bfloat16),
                                                ("float16", "fp16", torch.float16)])
def test_every_name_of_a_dtype_maps_to_it_and_back(long, short, dtype):
    assert torch_dtype(long) is torch_dtype(short) is torch_dtype(dtype) is dtype
    assert dtype_name(dtype) == dtype_name(short) == long
    assert short_dtype_name(dtype) == short_dtype_name(long) == short


def test_auto_is_resolved_by_the_device_and_refused_elsewhere():
    assert resolve_dtype("auto") is (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'auto': choose one of bf16, fp16, fp32"):
        torch_dtype("auto")
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        dtype_name(torch.float64)
