"""Import torchvision on a CPU-only torch.

The only torchvision 0.28.0 wheel is the CUDA build; on CPU torch its C extension fails to register
and ``import torchvision`` raises ``RuntimeError: operator torchvision::nms does not exist``. The
Python parts (datasets, transforms) do not need that extension, so on exactly that error we define
the two operator schemas torchvision's Python code refers to at import time and import again. The C++
ops (nms, roi_align, decode_jpeg) then raise if called; nothing in the harness calls them. Where
torchvision imports normally (a GPU cluster with matching builds) this does nothing.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_fragment = None  # keep the library alive for the life of the process


def import_torchvision() -> ModuleType:
    global _fragment
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision
