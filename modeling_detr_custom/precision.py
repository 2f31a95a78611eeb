"""The inference precision of the tools (`--dtype` of predict.py and evaluate_model.py): fp32, or bf16 autocast.

Not remote code: nothing in the model, config, loss or processor files imports this module (a model loaded from
the Hub runs without it; its pipeline takes ``dtype=torch.bfloat16`` instead, README "Use a model").

bf16 runs the convolutions, linear layers and attention in bfloat16 under ``torch.autocast``; the weights stay
float32, the sine positions are computed in float32 (as the original) and post-processing works in float32 whatever
dtype the outputs come in. fp32 (the default) runs no autocast at all, so its outputs are bit-identical to a call
without this module.
"""

from __future__ import annotations

import contextlib
import platform

import torch

DTYPES = ("fp32", "bf16")


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware, the condition for ``--dtype bf16`` on CPU.

    oneDNN (mkldnn) runs the bf16 convolutions and matmuls; its own check,
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, is also true on x86 CPUs with AVX-512 but without bf16
    instructions, where oneDNN emulates bf16 through float32 and is slower than fp32 (AVX512-BW/VL/DQ is all it
    asks for there). So on x86 native means AVX512-BF16 or AMX (whose tiles come with AMX-BF16 on every CPU that
    has them); on Arm, oneDNN's check is the BF16 extension itself.
    """
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def _device_type(device: torch.device | str) -> str:
    """'cpu', 'cuda', ... of ``device`` (a torch.device or a string such as 'cuda:1'); ValueError for a bad name."""
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from None


def check_inference_dtype(dtype: str, device: torch.device | str) -> None:
    """Refuse, before any work, a ``dtype`` the tools do not know or ``device`` cannot run.

    Args:
        dtype: one of `DTYPES`: "fp32" (always possible) or "bf16".
        device: where the model runs ("cpu", "cuda", "cuda:1" or a torch.device).

    Raises:
        ValueError, one line: ``dtype`` not in `DTYPES`; "bf16" on a CPU without native bfloat16 (naming its
        capability, see `_cpu_has_native_bf16`), on a GPU without native bf16 (`torch.cuda.is_bf16_supported`
        without emulation) or without any GPU, or on a device type other than cpu and cuda (whose support cannot be
        checked here).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "fp32":
        return
    kind = _device_type(device)
    if kind == "cpu":
        if not _cpu_has_native_bf16():
            capability = torch.backends.cpu.get_cpu_capability()
            raise ValueError(f"--dtype bf16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX on x86, BF16 on Arm); "
                             f"this CPU has {capability} without it (torch.backends.cpu.get_cpu_capability()); "
                             "use --dtype fp32")
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--dtype bf16 on {str(device)!r}: no CUDA GPU is available; use --dtype fp32")
        index = torch.device(device).index
        with torch.cuda.device(torch.cuda.current_device() if index is None else index):
            # native only, as on the CPU: an older GPU emulates bf16 (including_emulation's default), slowly
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            name = torch.cuda.get_device_name()
        if not native:
            raise ValueError(f"--dtype bf16 needs a GPU with native bfloat16 (compute capability 8.0+); {name} "
                             "has none; use --dtype fp32")
    else:
        raise ValueError(f"--dtype bf16 is supported on cpu and cuda devices; got device {str(device)!r}; "
                         "use --dtype fp32")


def inference_autocast(dtype: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a model's forward runs in for ``dtype`` on ``device``, checked by `check_inference_dtype` first.

    "bf16": ``torch.autocast(device type, dtype=torch.bfloat16)``: convolutions, linear layers and attention in
    bfloat16 with float32 weights; the model's sine positions are computed in float32 (its own dtypes, which
    autocast does not touch). "fp32": ``contextlib.nullcontext()``, nothing changes: outputs are bit-identical to
    a forward without this context.

    Wrap the forward only: post-processing (`post_process_object_detection`) casts to float32 itself.
    """
    check_inference_dtype(dtype, device)
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=torch.bfloat16)


__all__ = ["DTYPES", "check_inference_dtype", "inference_autocast"]
