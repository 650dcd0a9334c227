"""Checkpoints written by the reference code, converted into this harness's networks.

Five formats, each what one repository's training script saves:

- ``msdnet``: kalviny/MSDNet-PyTorch ``main.py``: ``{'state_dict': model.state_dict(), ...}`` of an
  ``nn.DataParallel`` model (``module.`` prefixes; ``features.module.`` for its alexnet/vgg path).
- ``l2w``: LeapLabTHU/L2W-DEN: ``{'state_dict': model.module.state_dict(), 'meta_state_dict': ...}``
  of its DDP MSDNet (no prefix); the weight-prediction network is not needed to evaluate.
- ``ranet``: yangle15/RANet-pytorch ``main.py``: as ``msdnet``, for RANet.
- ``boostnet``: SHI-Labs/Boosted-Dynamic-Networks: ``{'state_dict': {'model': backbone.state_dict()}}``
  (``module.`` on ImageNet, where the backbone is a DDP), MSDNet or RANet.
- ``eenets``: eksuas/eenets.pytorch ``utils.save_model``: ``torch.save(model)``, the whole pickled
  model object (stages and exits in ``nn.DataParallel`` after ``--multi-gpu``).

Every file but the EENets one is read with ``torch.load(weights_only=True)``. A whole pickled model
cannot be: its pickle names the EENets classes. It is read by a restricted unpickler whose class
look-up returns inert stand-ins for every name except the handful of torch functions that rebuild
tensors (those ``weights_only`` allows too); a stand-in only records what the pickle hands it, so
nothing a file names is imported or run, and the tensors are collected from the recorded module
state.

The mapping from reference names to the harness's is written from the two architectures'
structure (``REFERENCE_NAMES``): for every tensor of the harness network, the name the reference
module tree gives it. Conversion then checks the checkpoint tensor by tensor, on name and shape,
and fails naming the first tensors that differ and the architecture parameters to check, from a
structural summary of both sides (exits, layers per block, widths, classes).
"""

from __future__ import annotations

import _compat_pickle
import functools
import lzma
import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import InputSpec, MultiExitNetwork, build_model

from .io import CorruptFileError


class CheckpointError(CorruptFileError):
    """A reference checkpoint that cannot be read, or does not fit the architecture as configured."""


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    repository: str
    families: tuple[str, ...]  # harness architecture families the format holds
    whole_model: bool = False  # a pickled model object (read by the restricted unpickler)


FORMATS: dict[str, CheckpointFormat] = {
    f.name: f
    for f in (
        CheckpointFormat("msdnet", "kalviny/MSDNet-PyTorch", ("msdnet",)),
        CheckpointFormat("l2w", "LeapLabTHU/L2W-DEN", ("msdnet",)),
        CheckpointFormat("ranet", "yangle15/RANet-pytorch", ("ranet",)),
        CheckpointFormat("boostnet", "SHI-Labs/Boosted-Dynamic-Networks", ("msdnet", "ranet")),
        CheckpointFormat("eenets", "eksuas/eenets.pytorch", ("ee_resnet",), whole_model=True),
    )
}


def checkpoint_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise KeyError(f"unknown checkpoint format {name!r}; allowed: {', '.join(FORMATS)}")
    return FORMATS[name]


# ============================================================================================
# Reading files
# ============================================================================================
def _open_bytes(path: Path) -> bytes | None:
    """The file's bytes if it is xz-compressed (decompressed), else None (read it directly)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\xfd7zXZ\x00":
        return None
    try:
        return lzma.decompress(path.read_bytes())
    except lzma.LZMAError as err:
        raise CheckpointError(f"{path}: corrupt or truncated xz file ({err})") from None


def _torchscript(path: Path, data: bytes | None) -> bool:
    import io

    source = io.BytesIO(data) if data is not None else path
    try:
        with zipfile.ZipFile(source) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _truncated(path: Path, err: Exception) -> CheckpointError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return CheckpointError(f"{path}: corrupt or truncated checkpoint, or not a file torch.save wrote ({first})")


def load_weights_only(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with the harness's messages (an ``.xz`` file is unpacked)."""
    import io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    data = _open_bytes(path)
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        named = re.search(r"GLOBAL (\S+)", text)
        if named is None:
            raise _truncated(path, err) from None
        raise CheckpointError(
            f"{path}: this file holds Python objects other than tensors (it names {named.group(1)}); "
            "checkpoints are read as data only. A whole pickled EENets model is read with format 'eenets'; "
            "for the other formats give the checkpoint the training script saved (a dict with 'state_dict')"
        ) from None
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise _truncated(path, err) from None


# --- the restricted unpickler ----------------------------------------------------------------
class Inert:
    """What the restricted unpickler makes of a class or callable a pickle names: calling it (a
    pickle's REDUCE or NEWOBJ) or giving it state (BUILD) only records the arguments."""

    qualified_name = ""
    dump_patches = False  # read by torch's legacy loader

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on a dict subclass
        self.items.append((key, value))

    def append(self, value: Any) -> None:  # APPENDS on a list subclass
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = type(name, (Inert,), {"qualified_name": f"{module}.{name}", "__module__": __name__})
    return _STAND_INS[key]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (pickle protocols 0 and 1) for stand-in classes only."""
    if isinstance(cls, type) and issubclass(cls, Inert):
        return cls()
    return _stand_in("copyreg", "_reconstructor")(cls, base, state)


@functools.lru_cache(maxsize=1)
def _allowed() -> dict[tuple[str, str], Any]:
    """The only real objects a restricted load may hand to a pickle: containers and the functions
    torch uses to rebuild tensors and parameters (all of which ``weights_only`` allows)."""
    import torch._utils as tu

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("copyreg", "_reconstructor"): _reconstructor,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        if hasattr(tu, name):
            allowed[("torch._utils", name)] = getattr(tu, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (``__builtin__.set``) that protocol-2 pickles use, as pickle maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return _allowed().get((module, name)) or _stand_in(module, name)


_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="eebench.checkpoints.restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kwargs: _RestrictedUnpickler(f, **kwargs).load(),
)


def load_restricted(path: str | Path) -> Any:
    """A ``torch.save``d object (zip or legacy format) with every class and callable it names
    replaced by an inert stand-in; tensors are rebuilt by torch's own rebuild functions."""
    import io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    data = _open_bytes(path)
    if _torchscript(path, data):  # torch.load would hand these to torch.jit.load, which runs code
        raise CheckpointError(f"{path}: a TorchScript archive, not a saved model or state dict; refused")
    try:
        with warnings.catch_warnings():  # the legacy loader warns it cannot check stand-ins' source
            warnings.simplefilter("ignore")
            return torch.load(
                io.BytesIO(data) if data is not None else path,
                map_location="cpu",
                weights_only=False,
                pickle_module=_RESTRICTED_PICKLE,
            )
    except Exception as err:
        raise _truncated(path, err) from None


def _is_module(obj: Any) -> bool:
    return isinstance(obj, Inert) and isinstance(obj.state, dict) and "_parameters" in obj.state


def module_tensors(obj: Inert, prefix: str = "") -> dict[str, torch.Tensor]:
    """A stand-in module's parameters and persistent buffers, named as its ``state_dict`` would
    name them; modules an object keeps in a plain list (EENets' exit pooling) are named
    ``<attribute>.<index>``, as if the list were a ModuleList."""
    state = obj.state
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if isinstance(tensor, torch.Tensor) and name not in skip:
                out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if _is_module(child):
            out.update(module_tensors(child, f"{prefix}{name}."))
    for name, value in state.items():
        if not name.startswith("_") and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if _is_module(item):
                    out.update(module_tensors(item, f"{prefix}{name}.{i}."))
    return out


# --- a format's state dict -------------------------------------------------------------------
def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_parallel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module`` name components DataParallel and DDP add (``module.x``, ``features.module.x``)."""
    return {".".join(p for p in key.split(".") if p != "module"): value for key, value in state.items()}


def _state_dict_of(obj: Any, fmt: CheckpointFormat, path: Path) -> dict[str, torch.Tensor]:
    candidates = [obj]
    if isinstance(obj, dict):
        inner = obj.get("state_dict")
        candidates = [inner, inner.get("model") if isinstance(inner, dict) else None, obj.get("model"), obj]
    for candidate in candidates:
        if _is_state_dict(candidate):
            return _strip_parallel(dict(candidate))
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"{path}: no state dict found in this {fmt.name} checkpoint (expected 'state_dict' "
        f"as {fmt.repository} saves it; found {keys})"
    )


def read_checkpoint(path: str | Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's tensors under the reference's own names (parallel wrappers stripped), and
    what the file says about the model (for EENets: the attributes of the pickled model)."""
    spec, path = checkpoint_format(fmt), Path(path)
    if not spec.whole_model:
        return _state_dict_of(load_weights_only(path), spec, path), {}
    obj = load_restricted(path)
    if _is_module(obj):
        about = {
            k: v for k, v in obj.state.items() if isinstance(v, (int, float, str, tuple)) and not k.startswith("_")
        }
        return _strip_parallel(module_tensors(obj)), {"class": obj.qualified_name, **about}
    if isinstance(obj, Inert):
        raise CheckpointError(f"{path}: the pickle holds a {obj.qualified_name} object, not a model")
    return _state_dict_of(obj, spec, path), {}


# ============================================================================================
# Reference names of the harness's tensors
# ============================================================================================
def _conv_index(layer: str, sub: str) -> int:
    """Position in a reference ``ConvBN.net`` Sequential ([conv, bn, relu] per conv) of the
    harness's ``<layer>.<sub>`` inside a Sequential of ConvBNReLUs."""
    return 3 * int(layer) + int(sub)


def _msdnet_names(network: MultiExitNetwork) -> Callable[[str], str | None]:
    imagenet = isinstance(network.stem.layers[0][-1], torch.nn.MaxPool2d)
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (
            r"stem\.layers\.(\d+)\.(\d+)\.(\w+)",
            lambda m: (
                f"blocks.0.0.layers.0.{m[2]}.{m[3]}"
                if m[1] == "0" and imagenet
                else f"blocks.0.0.layers.{m[1]}.net.{m[2]}.{m[3]}"
            ),
        ),
        # the reference's first block starts with the stem (MSDNFirstLayer)
        (
            r"blocks\.(\d+)\.(\d+)\.units\.(\d+)\.(down|regular)\.(\d+)\.(\d+)\.(\w+)",
            lambda m: (
                f"blocks.{m[1]}.{int(m[2]) + (m[1] == '0')}.layers.{m[3]}."
                f"{'conv_down' if m[4] == 'down' else 'conv_normal'}.net.{_conv_index(m[5], m[6])}.{m[7]}"
            ),
        ),
        (
            r"blocks\.(\d+)\.(\d+)\.convs\.(\d+)\.(\d+)\.(\w+)",
            lambda m: f"blocks.{m[1]}.{int(m[2]) + (m[1] == '0')}.m.{m[3]}.net.{m[4]}.{m[5]}",
        ),
        (r"heads\.(\d+)\.body\.(\d+)\.(\d+)\.(\w+)", lambda m: f"classifier.{m[1]}.m.{m[2]}.net.{m[3]}.{m[4]}"),
        (r"heads\.(\d+)\.linear\.(\w+)", lambda m: f"classifier.{m[1]}.linear.{m[2]}"),
    ]
    return _by_rules(rules)


def _ranet_names(network: MultiExitNetwork) -> Callable[[str], str | None]:
    imagenet = isinstance(network.stem.layers[0][-1], torch.nn.MaxPool2d)
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (
            r"stem\.layers\.(\d+)\.(\d+)\.(\w+)",
            lambda m: (
                f"FirstLayer.layers.0.{m[2]}.{m[3]}"
                if m[1] == "0" and imagenet
                else f"FirstLayer.layers.{m[1]}.net.{m[2]}.{m[3]}"
            ),
        ),
        (
            r"flows\.(\d+)\.(\d+)\.layers\.(\d+)\.(conv|conv_low)\.(\d+)\.(\d+)\.(\w+)",
            lambda m: (
                f"scale_flows.{m[1]}.{m[2]}.layers.{m[3]}.{'conv_normal' if m[4] == 'conv' else 'conv_up'}"
                f".net.{_conv_index(m[5], m[6])}.{m[7]}"
            ),
        ),
        (
            r"flows\.(\d+)\.(\d+)\.from_low\.(\d+)\.(\w+)",
            lambda m: f"scale_flows.{m[1]}.{m[2]}.conv_last.net.{m[3]}.{m[4]}",
        ),
        (
            r"flows\.(\d+)\.(\d+)\.transition\.(\d+)\.(\w+)",
            lambda m: f"scale_flows.{m[1]}.{m[2]}.trans.net.{m[3]}.{m[4]}",
        ),
        (r"heads\.(\d+)\.body\.(\d+)\.(\d+)\.(\w+)", lambda m: f"classifier.{m[1]}.m.{m[2]}.net.{m[3]}.{m[4]}"),
        (r"heads\.(\d+)\.linear\.(\w+)", lambda m: f"classifier.{m[1]}.linear.{m[2]}"),
    ]
    return _by_rules(rules)


_RESIDUAL = {0: "conv1", 1: "bn1", 3: "conv2", 4: "bn2", 6: "conv3", 7: "bn3"}


def _ee_resnet_names(network: MultiExitNetwork) -> Callable[[str], str | None]:
    exit_blocks, early = list(network.exit_blocks), network.num_early_exits

    def stage_position(b: int) -> str:
        """The reference's ``stages[s][j]``: stage s runs up to the block of early exit s; stage 0
        starts with the stem."""
        s = sum(e < b for e in exit_blocks)
        return f"stages.{s}.{b + 1 if s == 0 else b - exit_blocks[s - 1] - 1}"

    def head(m: re.Match) -> str:
        # the final exit's heads are the reference network's own classifier and confidence
        return f"exits.{m[1]}.{m[2]}.0.{m[3]}" if int(m[1]) < early else f"{m[2]}.0.{m[3]}"

    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"stem\.(\d+)\.(\w+)", lambda m: f"stages.0.0.{m[1]}.{m[2]}"),
        (
            r"blocks\.(\d+)\.residual\.(\d+)\.(\w+)",
            lambda m: f"{stage_position(int(m[1]))}.{_RESIDUAL[int(m[2])]}.{m[3]}",
        ),
        (r"blocks\.(\d+)\.shortcut\.(\d+)\.(\w+)", lambda m: f"{stage_position(int(m[1]))}.downsample.{m[2]}.{m[3]}"),
        (r"exits\.(\d+)\.pool\.0\.(\w+)", lambda m: f"exits.{m[1]}.layers.0.{m[2]}"),  # bnpool's BatchNorm
        (r"exits\.(\d+)\.(confidence|classifier)\.(\w+)", head),
    ]
    return _by_rules(rules)


def _by_rules(rules: list[tuple[str, Callable[[re.Match], str]]]) -> Callable[[str], str | None]:
    compiled = [(re.compile(pattern), make) for pattern, make in rules]

    def rename(name: str) -> str | None:
        for pattern, make in compiled:
            m = pattern.fullmatch(name)
            if m:
                return make(m)
        return None

    return rename


def _ee_resnet_unused(network: MultiExitNetwork, key: str) -> bool:
    """With ``exit_pool: bnpool_batchstats`` the reference's exit BatchNorm (``exits.k.layers.0``,
    a plain-list module that never learns and always normalises by the batch) has no tensors here."""
    return (
        network.config.exit_pool == "bnpool_batchstats" and re.fullmatch(r"exits\.\d+\.layers\.0\.\w+", key) is not None
    )


_UNUSED: dict[str, Callable[[MultiExitNetwork, str], bool]] = {"ee_resnet": _ee_resnet_unused}


# family -> a function of the built network giving each of its tensor names the reference's
REFERENCE_NAMES: dict[str, Callable[[MultiExitNetwork], Callable[[str], str | None]]] = {
    "msdnet": _msdnet_names,
    "ranet": _ranet_names,
    "ee_resnet": _ee_resnet_names,
}


def reference_names(family: str, network: MultiExitNetwork) -> dict[str, str]:
    """{harness tensor name: reference tensor name} for every tensor of ``network``."""
    rename = REFERENCE_NAMES[family](network)
    out = {}
    for name in network.state_dict():
        ref = rename(name)
        if ref is None:  # a module the mapping does not know: a bug here, not in the checkpoint
            raise RuntimeError(f"no reference name for {family} tensor {name!r}")
        out[name] = ref
    return out


# ============================================================================================
# Structural summaries, for mismatch messages
# ============================================================================================
Shapes = dict[str, tuple[int, ...]]


def _count(shapes: Shapes, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.groups() for k in shapes if (m := regex.match(k))})


def _shape(shapes: Shapes, *names: str, dim: int = 0) -> int | None:
    for name in names:
        if name in shapes:
            return shapes[name][dim] if len(shapes[name]) > dim else None
    return None


def _msdnet_summary(shapes: Shapes) -> dict[str, tuple[Any, str]]:
    n_blocks = _count(shapes, r"classifier\.(\d+)\.")
    layers = [_count(shapes, rf"blocks\.{b}\.(\d+)\.layers\.\d+\.conv_normal\.") for b in range(n_blocks)]
    transitions = [_count(shapes, rf"blocks\.{b}\.(\d+)\.m\.") for b in range(n_blocks)]
    n_scales = _count(shapes, r"blocks\.0\.0\.layers\.(\d+)\.")
    stem = [
        _shape(shapes, f"blocks.0.0.layers.{i}.net.0.weight", f"blocks.0.0.layers.{i}.0.weight")
        for i in range(n_scales)
    ]
    first = (
        "blocks.0.0.layers.0.0.weight"
        if "blocks.0.0.layers.0.0.weight" in shapes
        else "blocks.0.0.layers.0.net.0.weight"
    )
    return {
        "exits": (n_blocks, "n_blocks"),
        "MSD layers per block": (layers, "n_blocks, step, base, step_mode"),
        "transition layers per block": (transitions, "prune, reduction, n_scales"),
        "scales": (n_scales, "n_scales, gr_factor, bn_factor"),
        "stem widths per scale": (stem, "n_channels, gr_factor"),
        "stem kernel": (
            _shape(shapes, first, dim=3),
            "dataset: 7x7 stem and ImageNet heads for inputs of 64 pixels and more",
        ),
        "bottleneck convs": ("blocks.0.1.layers.0.conv_normal.net.3.weight" in shapes, "bottleneck"),
        "classes": (_shape(shapes, "classifier.0.linear.weight"), "dataset"),
    }


def _ranet_summary(shapes: Shapes) -> dict[str, tuple[Any, str]]:
    n_flows = _count(shapes, r"scale_flows\.(\d+)\.")
    blocks = [_count(shapes, rf"scale_flows\.{f}\.(\d+)\.") for f in range(n_flows)]
    layers = [
        [_count(shapes, rf"scale_flows\.{f}\.{b}\.layers\.(\d+)\.") for b in range(n)] for f, n in enumerate(blocks)
    ]
    n_stem = _count(shapes, r"FirstLayer\.layers\.(\d+)\.")
    stem = [
        _shape(shapes, f"FirstLayer.layers.{i}.net.0.weight", f"FirstLayer.layers.{i}.0.weight") for i in range(n_stem)
    ]
    first = (
        "FirstLayer.layers.0.0.weight"
        if "FirstLayer.layers.0.0.weight" in shapes
        else "FirstLayer.layers.0.net.0.weight"
    )
    return {
        "exits": (_count(shapes, r"classifier\.(\d+)\."), "n_blocks, block_step, scale_list"),
        "scale flows": (n_flows, "scale_list, gr_factor, bn_factor"),
        "blocks per flow": (blocks, "n_blocks, block_step"),
        "layers per block": (layers, "step, step_mode"),
        "transitions per flow": (
            [_count(shapes, rf"scale_flows\.{f}\.(\d+)\.trans\.") for f in range(n_flows)],
            "scale_list, reduction",
        ),
        "stem widths": (stem, "n_channels, gr_factor, scale_list"),
        "stem kernel": (
            _shape(shapes, first, dim=3),
            "dataset: 7x7 stem and ImageNet heads for inputs of 64 pixels and more",
        ),
        "classes": (_shape(shapes, "classifier.0.linear.weight"), "dataset"),
    }


def _ee_resnet_summary(shapes: Shapes) -> dict[str, tuple[Any, str]]:
    n_stages = _count(shapes, r"stages\.(\d+)\.")
    per_stage = [_count(shapes, rf"stages\.{s}\.(\d+)\.conv1\.") for s in range(n_stages)]
    return {
        "residual blocks": (sum(per_stage), "depth, style"),
        "bottleneck blocks": (any(k.endswith("conv3.weight") for k in shapes), "depth, style"),
        "early exits": (_count(shapes, r"exits\.(\d+)\."), "num_exits"),
        "residual blocks before each exit": (per_stage, "num_exits, distribution"),
        "stem kernel and width": (
            (_shape(shapes, "stages.0.0.0.weight", dim=3), _shape(shapes, "stages.0.0.0.weight")),
            "style, width",
        ),
        "early exit features": (_shape(shapes, "exits.0.classifier.0.weight", dim=1), "exit_pool"),
        "classes": (_shape(shapes, "classifier.0.weight"), "dataset"),
    }


SUMMARIES: dict[str, Callable[[Shapes], dict[str, tuple[Any, str]]]] = {
    "msdnet": _msdnet_summary,
    "ranet": _ranet_summary,
    "ee_resnet": _ee_resnet_summary,
}
# parameters that set widths without changing the structure the summaries count
WIDTH_PARAMS = {
    "msdnet": "growth_rate, gr_factor, bn_factor, reduction, n_channels",
    "ranet": "growth_rate, gr_factor, bn_factor, compress_factor, reduction, n_channels",
    "ee_resnet": "width, exit_pool",
}
# names only a checkpoint of each family has
SIGNATURES = {
    "msdnet": ("blocks.0.0.layers.", "classifier.0.linear."),
    "ranet": ("scale_flows.", "FirstLayer."),
    "ee_resnet": ("stages.0.", "exits."),
}


def _family_of(names: list[str]) -> str | None:
    for family, prefixes in SIGNATURES.items():
        if all(any(n.startswith(p) for n in names) for p in prefixes):
            return family
    return None


def _formats_for(family: str) -> str:
    return ", ".join(f.name for f in FORMATS.values() if family in f.families)


def _with_values(hint: str, arch_config: Any) -> str:
    """``n_blocks, step`` -> ``n_blocks=5, step=4`` (the configured values); other hints as they are."""
    names = hint.split(", ")
    if not all(hasattr(arch_config, n) for n in names):
        return hint
    return ", ".join(f"{n}={getattr(arch_config, n)!r}" for n in names)


def _differences(family: str, checkpoint: Shapes, expected: Shapes, arch_config: Any) -> str:
    ours, theirs = SUMMARIES[family](expected), SUMMARIES[family](checkpoint)
    lines, params = [], []
    for key, (value, hint) in theirs.items():
        mine = ours[key][0]
        if value != mine:
            lines.append(f"{key}: {value} in the checkpoint, {mine} as configured")
            params.append(_with_values(hint, arch_config))
    if not lines:
        return (
            f"The structure is the same; check the width parameters ({_with_values(WIDTH_PARAMS[family], arch_config)})"
        )
    return "; ".join(lines) + f". Check {'; '.join(dict.fromkeys(params))}"


# ============================================================================================
# Conversion
# ============================================================================================
def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def convert_state(
    source: dict[str, torch.Tensor],
    network: MultiExitNetwork,
    family: str,
    fmt: str,
    path: str | Path,
    described: str = "",
) -> dict[str, torch.Tensor]:
    """The harness state dict of ``network`` from a checkpoint's reference-named tensors, checked
    tensor by tensor on name and shape."""
    spec = checkpoint_format(fmt)
    names = reference_names(family, network)
    ours = network.state_dict()
    expected = {ref: tuple(ours[name].shape) for name, ref in names.items()}
    if not any(k.endswith("num_batches_tracked") for k in source):  # torch < 0.4.1 had no such buffer
        expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    have = {k: tuple(v.shape) for k, v in source.items()}
    missing = [k for k in expected if k not in have]
    wrong = [k for k in expected if k in have and have[k] != expected[k]]
    used = {_storage_key(source[k]) for k in expected if k in have}
    unused = _UNUSED.get(family, lambda net, key: False)
    # aliases (EENets registers its last stage twice) are not extra tensors, nor reference tensors
    # that the network as configured computes without (EENets' untracked exit BatchNorm)
    extra = [k for k in have if k not in expected and _storage_key(source[k]) not in used and not unused(network, k)]
    if missing or wrong or extra:
        raise CheckpointError(
            _mismatch_message(path, spec, family, network, have, expected, missing, wrong, extra, described)
        )
    out = {}
    for name, ref in names.items():
        tensor = source.get(ref)
        out[name] = (
            tensor.to(ours[name].dtype).clone() if tensor is not None else torch.zeros_like(ours[name])
        )  # a missing num_batches_tracked: unused in eval
    return out


def _mismatch_message(path, spec, family, network, have, expected, missing, wrong, extra, described) -> str:
    where = f"{path}: this {spec.name} checkpoint"
    found = _family_of(list(have))
    if found is not None and found != family:
        return (
            f"{where} holds a {found} network (tensors {', '.join(SIGNATURES[found])}...), not {family}; "
            f"convert it with --arch {found} and a format of that family ({_formats_for(found)})"
        )
    if found is None:
        return (
            f"{where} has none of the tensors a {family} network of {spec.repository} has (first names: "
            f"{', '.join(sorted(have)[:4]) or 'none'}); is it a checkpoint of this repository?"
        )
    parts = [
        f"{len(wrong)} of different shape" if wrong else "",
        f"{len(missing)} missing" if missing else "",
        f"{len(extra)} not in the {family} network as configured" if extra else "",
    ]
    first = [f"{k} {list(have[k])} in the checkpoint, {list(expected[k])} expected" for k in wrong[:3]]
    first += [f"{k} missing" for k in missing[:3]] + [f"{k} unexpected" for k in extra[:3]]
    about = f" ({described})" if described else ""
    return (
        f"{where}{about} does not fit {family} as configured: tensors {', '.join(p for p in parts if p)}; "
        f"first: {'; '.join(first[:6])}. {_differences(family, have, expected, network.config)}"
    )


def _describe(about: dict[str, Any]) -> str:
    keys = ("total_layers", "num_ee", "distribution", "exit_type", "num_classes")
    shown = [f"{k} {about[k]!r}" for k in keys if k in about]
    return f"{about.get('class', 'model')}: {', '.join(shown)}" if shown else ""


def convert_checkpoint(
    path: str | Path, fmt: str, family: str, input_spec: InputSpec, params: dict[str, Any] | None = None
) -> tuple[MultiExitNetwork, dict[str, torch.Tensor]]:
    """Build the harness network ``family(params)`` for ``input_spec`` and its state dict from a
    reference checkpoint; raises CheckpointError naming what does not fit."""
    spec = checkpoint_format(fmt)
    if family not in spec.families:
        raise CheckpointError(
            f"{path}: format {fmt!r} ({spec.repository}) holds {' or '.join(spec.families)} "
            f"checkpoints, not {family!r}; allowed formats for {family}: {_formats_for(family) or 'none'}"
        )
    network = build_model(family, input_spec, **(params or {}))
    source, about = read_checkpoint(path, fmt)
    state = convert_state(source, network, family, fmt, path, _describe(about))
    network.load_state_dict(state)
    return network, state
