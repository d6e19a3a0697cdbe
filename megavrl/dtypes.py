"""Weight dtype names, one table: the config's (``model.dtype``: float32 | bfloat16 | float16 |
auto), the converters' short ones (``--dtype``: fp32 | bf16 | fp16) and torch's dtypes.

    torch_dtype("bf16") is torch_dtype("bfloat16") is torch.bfloat16
    resolve_dtype("auto")             # bfloat16 with CUDA, float32 on the CPU
    dtype_name(torch.bfloat16)        # "bfloat16" (config.json's torch_dtype, checkpoint markers)
    short_dtype_name("bfloat16")      # "bf16" (the converters' --dtype)
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_LONG_NAMES = {short: name for name, short in SHORT_NAMES.items()}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its long or short name (a torch dtype passes through); ValueError otherwise."""
    if isinstance(name, torch.dtype):
        return name
    dtype = DTYPES.get(_LONG_NAMES.get(name, name))
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(sorted(_LONG_NAMES))}")
    return dtype


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """As :func:`torch_dtype`, and "auto": bfloat16 where CUDA is available, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch_dtype(name)


def dtype_name(dtype: str | torch.dtype) -> str:
    """The long name ("bfloat16") of a dtype or of either of its names."""
    dtype = torch_dtype(dtype)
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}: choose one of {', '.join(DTYPES)}")


def short_dtype_name(dtype: str | torch.dtype) -> str:
    """The short name ("bf16") of a dtype or of either of its names."""
    return SHORT_NAMES[dtype_name(dtype)]
