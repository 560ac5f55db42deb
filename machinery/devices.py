"""Which device a run uses: --device=auto takes cuda, then mps, then cpu."""

import torch


def pick_device(device="auto"):
    """cuda -> mps -> cpu, unless a device is named; a named device that is not there raises
    ValueError with one line that says so."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device}: CUDA is not available on this machine; use --device=cpu (or auto)")
    if device == "mps" and not has_mps:
        raise ValueError("--device=mps: MPS is not available on this machine; use --device=cpu (or auto)")
    return device
