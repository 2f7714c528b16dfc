"""diffusers' `save_pretrained` / `from_pretrained` keyword arguments, for the Pruned* classes (pipeline.py).

A pruned component folder is one safetensors file (`diffusion_pytorch_model[.<variant>].safetensors`)
beside config.json and pruning.json, built on the meta device and loaded strictly. The options
diffusers passes on that fit this are honoured (variant, torch_dtype/dtype, device_map to one device,
output_loading_info, is_main_process, a max_shard_size the file fits in); options that ask for something
else (pickles, shards, offloading, quantization, a hub upload) are refused with one line naming the
value and what is allowed, never silently dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DiffpruneError
from .variants import check_variant

# from_pretrained options whose value does not change how a pruned folder loads: any value is fine
# (the model is always built on the meta device from one file read whole).
LOAD_ANY = ("low_cpu_mem_usage", "disable_mmap")
# from_pretrained options allowed only at these values (what a pruned folder's loading does).
LOAD_ONLY = {"use_safetensors": (None, True), "ignore_mismatched_sizes": (False,), "quantization_config": (None,),
             "max_memory": (None,), "offload_folder": (None,), "offload_state_dict": (None, False),
             "use_flashpack": (False,), "dduf_entries": (None,), "parallel_config": (None,), "from_flax": (False,),
             "cache_dir": (None,), "force_download": (False,), "proxies": (None,), "local_files_only": (None, False),
             "token": (None,)}
LOAD_WHY = {"use_safetensors": "diffprune reads safetensors only, never pickles",
            "ignore_mismatched_sizes": "pruned weights load strictly",
            "cache_dir": "set HF_HOME or HF_HUB_CACHE instead", "force_download": "delete the cached copy instead",
            "proxies": "set HTTPS_PROXY instead", "local_files_only": "set HF_HUB_OFFLINE=1 instead",
            "token": "log in with `hf auth login` or set HF_TOKEN instead"}
# the options the methods take by name or handle themselves (named in the refusal of an unknown one)
LOAD_NAMED = ("subfolder", "revision", "variant", "torch_dtype", "dtype", "device_map", "output_loading_info",
              *LOAD_ANY)
SAVE_NAMED = ("is_main_process", "variant", "max_shard_size")
# save_pretrained options allowed only at these values.
SAVE_ONLY = {"safe_serialization": (True,), "save_function": (None,), "push_to_hub": (False,),
             "use_flashpack": (False,)}
SAVE_WHY = {"safe_serialization": "diffprune writes safetensors only, never pickles",
            "push_to_hub": "save, then upload the folder with huggingface_hub"}


def _refuse(name: str, value: Any, allowed: tuple, why: str = "") -> None:
    shown = " or ".join(repr(a) for a in allowed)
    raise DiffpruneError(f"{name}={value!r} is not supported for a pruned model; allowed: {shown}"
                         + (f" ({why})" if why else ""))


def _check_values(options: dict[str, Any], only: dict[str, tuple], why: dict[str, str], known: tuple) -> None:
    """Refuse a name outside `only` (`known`: the names the caller handles, listed as allowed too) and
    a value `only` does not allow."""
    unknown = sorted(set(options) - set(only))
    if unknown:
        raise DiffpruneError(f"unexpected keyword argument(s) {unknown} for a pruned model; allowed: "
                             f"{sorted({*only, *known})}")
    for name, value in options.items():
        allowed = only.get(name)
        if allowed is not None and not any(value is a or (a is not None and value == a) for a in allowed):
            _refuse(name, value, allowed, why.get(name, ""))


def check_save_options(variant: str | None, max_shard_size: int | str | None, options: dict[str, Any]) -> str | None:
    """The checked variant; refuses options a one-file safetensors save cannot honour."""
    _check_values(options, SAVE_ONLY, SAVE_WHY, SAVE_NAMED)
    if max_shard_size is not None:
        shard_bytes(max_shard_size)
    return check_variant(variant)


def shard_bytes(max_shard_size: int | str) -> int:
    """`max_shard_size` in bytes (an int, or a string such as "5GB" / "500MiB", as diffusers reads it)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (TypeError, ValueError):
        size = None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise DiffpruneError(f"max_shard_size={max_shard_size!r} is not a size; allowed: a positive number of "
                             "bytes or a string such as '5GB', or None")
    return size


def check_fits_one_file(max_shard_size: int | str | None, nbytes: int) -> None:
    """A pruned model is saved as one file: refuse a `max_shard_size` it does not fit in."""
    if max_shard_size is not None and nbytes > shard_bytes(max_shard_size):
        raise DiffpruneError(f"max_shard_size={max_shard_size!r} is smaller than the weights ({nbytes} bytes); "
                             f"a pruned model is saved as one file; allowed: None or at least {nbytes} bytes")


def check_load_options(torch_dtype: Any, options: dict[str, Any]) -> tuple[torch.dtype | None, dict[str, Any]]:
    """(the dtype to load in, the remaining options: device_map, output_loading_info), after refusing
    options a pruned folder's loading cannot honour. `dtype` is diffusers' newer name of `torch_dtype`."""
    options = dict(options)
    dtype = options.pop("dtype", None)
    torch_dtype = dtype if dtype is not None else torch_dtype
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise DiffpruneError(f"torch_dtype={torch_dtype!r} is not a floating torch dtype; allowed: e.g. "
                             "torch.float32, torch.float16, torch.bfloat16, or None")
    rest = {k: options.pop(k) for k in ("device_map", "output_loading_info") if k in options}
    for name in LOAD_ANY:
        options.pop(name, None)
    _check_values(options, LOAD_ONLY, LOAD_WHY, LOAD_NAMED)
    if rest.get("device_map") is not None:
        rest["device_map"] = load_device(rest["device_map"])
    return torch_dtype, rest


def load_device(device_map: Any) -> torch.device:
    """The one device a `device_map` names ("cpu", "cuda:0", 0, a torch.device); no per-module maps."""
    if isinstance(device_map, torch.device):
        return device_map
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential") \
            or isinstance(device_map, int) and not isinstance(device_map, bool):
        try:
            return torch.device(device_map)
        except (RuntimeError, ValueError):
            pass
    raise DiffpruneError(f"device_map={device_map!r} is not supported for a pruned model; allowed: one device "
                         "such as 'cpu', 'cuda', 'cuda:0' or 0, or None (no per-module placement or offloading)")


def loading_info() -> dict[str, list]:
    """diffusers' `output_loading_info=True` report: a strict load leaves every list empty."""
    return {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
