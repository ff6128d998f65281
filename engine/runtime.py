"""The model registry, checkpoint files, device choice and the command-line runner: what train.py,
detect.py and the tools share."""
import argparse
import importlib
import os
import pickle
import platform
import sys

import numpy as np
import torch

MODELS = ("smca", "sparse_detr", "lite_detr", "focus_detr")  # the model files (train.py's docstring: what each has)
SHAPES_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "shapes")


def model_module(name):
    """The model file of that name (one of MODELS), imported."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the models are {', '.join(MODELS)}")
    return importlib.import_module(name)


def select_device(args):
    """--device (default: cuda if available, else cpu) -> torch.device; a clear error for one this machine lacks."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device (or torch is a CPU build)")
    return device


def cpu_has_bf16():
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Without, bf16 products are emulated, many times
    slower than float32."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_has_amx():
    """Does this CPU have AMX (Intel's bf16 matrix units)? A recipe's bf16 "amp" is taken only there."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def machine_name():
    """The processor's name (from /proc/cpuinfo on Linux), for logs and tables."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_cli(entry):
    """Run a command-line entry point: a bad input (ValueError) or a diverged run ends with its
    message and exit status 1, not a traceback."""
    try:
        entry()
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def first_free(path):
    """path, or path2, path3, ...: the first that does not exist yet (an output folder that replaces nothing)."""
    candidate, n = path, 2
    while os.path.exists(candidate):
        candidate, n = f"{path}{n}", n + 1
    return candidate


def save_atomic(obj, path):
    """torch.save through a temporary file: a crash mid-write never leaves a broken file at `path`."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def safe_globals():
    """What a checkpoint may hold beside tensors and plain containers: an argparse Namespace (the authors' files
    keep their flags in one) and numpy arrays (a numpy RNG state as np.random.get_state() gives it)."""
    return [argparse.Namespace, *_numpy_array_globals()]


def torch_file(path, what="checkpoint"):
    """torch.load(path, weights_only=True) with safe_globals(): unpickling builds only tensors, plain containers and
    those, so a file from anywhere cannot run code when opened. ValueError naming the file: one that asks for
    anything more is refused, saying how to re-save one you trust; one that is no torch file says so."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines()]
        wants = next((ln for ln in lines if "GLOBAL" in ln), None)  # "... unsupported GLOBAL posix.system ..."
        if wants is None:
            said = next((ln for ln in lines if ln.startswith("Unsupported") or "invalid load key" in ln), lines[-1])
            raise ValueError(f"{what} {path!r} is not a torch file ({said})") from e
        raise ValueError(
            f"{what} {path!r} holds objects other than tensors and plain data, so opening it could run code; it is "
            f"not loaded (torch said: {wants}). If you trust the file, re-save what a checkpoint holds once: python "
            f"-c \"import torch; c = torch.load('{path}', weights_only=False); torch.save({{k: c[k] for k in ('model', "
            f"'args', 'config', 'model_name', 'categories', 'epoch') if k in c}}, 'resaved.pth')\" (then check that "
            f"what was left out was not needed)") from e
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{what} {path!r} cannot be read ({type(e).__name__}: {first})") from e


def load_checkpoint(path):
    """A checkpoint file (ours, the authors', a state dict), read safely (torch_file)."""
    return torch_file(path, "checkpoint")


def _numpy_array_globals():
    """What unpickling a numpy array needs (numpy 1 and 2 name its module differently)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def backbone_weights(source):
    """--backbone-weights -> what common.load_backbone_weights takes: "imagenet", or the state dict
    read from a file (torchvision format, engine/pretrain.py's file, or one of our checkpoints, whose
    backbone is taken). Read with weights_only=True (safe_globals())."""
    if source == "imagenet":
        return source
    return torch_file(source, "backbone weights")
