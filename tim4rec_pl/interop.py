"""Reading checkpoints of the reference TiM4Rec code (RecBole `.pth` files) and of this package (`.ckpt`).

A reference checkpoint is a dict with `state_dict` (parameter names: docs/model.md) and `config`,
a pickled `recbole.config.Config` object. RecBole need not be installed: the file is read with a restricted
unpickler that rebuilds tensors and plain containers and turns every other class into an inert stub holding its
pickled state, from which the configuration values (`final_config_dict`) are taken. Nothing in the file is
imported or executed.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tim4rec_pl.checkpoints import INIT_FIX, read_checkpoint
from tim4rec_pl.errors import UserError
from tim4rec_pl.model.tim4rec import TiM4Rec
from tim4rec_pl.model.time_path import upgrade_state_dict

# ---------------------------------------------------------------------------------------------- restricted unpickler


class _Stub:
    """Stand-in for a class the file names but we do not import: accepts any constructor arguments and state."""

    _stub_path = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        obj = super().__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.__dict__["_stub_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses are rebuilt item by item
        self.__dict__.setdefault("_stub_items", {})[key] = value

    def append(self, value: Any) -> None:  # list subclasses too
        self.__dict__.setdefault("_stub_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_stub_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stub {self._stub_path}>"


_STUBS: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (_Stub,), {"_stub_path": f"{module}.{name}", "__module__": "tim4rec_pl.interop"})
    return _STUBS[key]


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (pickle protocols 0/1), allowed for stub classes only."""
    if not (isinstance(cls, type) and issubclass(cls, _Stub)):
        raise pickle.UnpicklingError(f"refusing to rebuild {cls!r}")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


_SAFE_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "dict", "list", "tuple",
                  "int", "float", "bool", "str", "object"}  # fmt: skip
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("torch.nn.parameter", "Parameter"): nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


def _numpy_global(module: str, name: str) -> Any | None:
    """The few numpy names arrays and scalars are pickled with (numpy may be missing)."""
    if module.split(".")[0] != "numpy":
        return None
    ok = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }
    if (module, name) not in ok and module != "numpy.dtypes":
        return None
    try:
        import importlib

        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # protocol-2 pickles name builtins the Python 2 way
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if module == "_codecs" and name == "encode":  # bytes under pickle protocol 2
            import codecs

            return codecs.encode
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return getattr(torch._utils, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype) or (name.endswith("Storage") and isinstance(value, type)):
                return value
        found = _numpy_global(module, name)
        if found is not None:
            return found
        return _stub_class(module, name)


def _restricted_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("tim4rec_pl_restricted_pickle")
    mod.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.loads = lambda b, **kw: _RestrictedUnpickler(io.BytesIO(b), **kw).load()  # type: ignore[attr-defined]
    mod.__dict__.update(
        {k: getattr(pickle, k) for k in ("Pickler", "dump", "dumps", "UnpicklingError", "HIGHEST_PROTOCOL")}
    )
    return mod


def _restricted_load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())


def _torch_load(path: str, option: str = "checkpoint") -> Any:
    """The file under the rule of ``tim4rec_pl.checkpoints``: weights-only; pickled objects only as the reference
    code's ``config`` entry, rebuilt as inert stubs (nothing imported or run)."""
    return read_checkpoint(
        path, option, restricted_load=_restricted_load, is_inert_object=lambda obj: isinstance(obj, _Stub)
    )


# ---------------------------------------------------------------------------------------------- reading


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    inner = getattr(config, "final_config_dict", None)  # recbole.config.Config keeps its values here
    if isinstance(inner, Mapping):
        return dict(inner)
    if isinstance(config, _Stub) and isinstance(config.__dict__.get("_stub_items"), dict):
        return dict(config.__dict__["_stub_items"])
    return {}


def read_recbole_checkpoint(
    path: str | os.PathLike, option: str = "checkpoint"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a reference (RecBole) checkpoint without RecBole.

    Args:
        path: a `.pth` file holding `{"state_dict": ..., "config": ...}`; a bare state dict is accepted too.
        option: names the file in error messages (``--model.init_from`` from the CLI).

    Returns:
        The state dict (tensors on CPU) and the configuration as a plain dict (empty when the file has none).
    """
    path = os.fspath(path)
    obj = _torch_load(path, option)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state, config = obj["state_dict"], _config_dict(obj.get("config"))
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state, config = obj, {}
    else:
        raise UserError(f"{option} {path}: no `state_dict` in the checkpoint; {INIT_FIX}")
    state = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    return state, config


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    return None


def tim4rec_kwargs_from_checkpoint(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Any]:
    """Every TiM4Rec constructor argument for a reference checkpoint.

    Shapes decide whatever they determine (num_items, d_model, num_layers, d_state, head_dim, expand, d_conv,
    is_time, is_ffn, p2p_residual and, with the time path, max_seq_len); the config supplies the rest (dropout,
    time_dropout, chunk_size, norm_eps, kaiming_init, max_seq_len without the time path). `norm_eps` and the
    xBC activation cannot be read from weights: when the config lacks them the defaults are used with a warning.
    """
    sd, cfg = state_dict, dict(config)
    try:
        num_items, d_model = sd["item_embedding.weight"].shape
        d_inner = sd["ssd_layers.0.ssd.norm.weight"].shape[0]
        heads = sd["ssd_layers.0.ssd.A_log"].shape[0]
        conv_dim, _, d_conv = sd["ssd_layers.0.ssd.conv1d.weight"].shape
    except (KeyError, ValueError) as err:
        raise UserError(
            f"not a TiM4Rec reference state dict: {err} is missing or malformed; pass a TiM4Rec checkpoint"
        ) from None
    is_time = "layer_norm_time.weight" in sd
    kwargs: dict[str, Any] = {
        "num_items": int(num_items),
        "d_model": int(d_model),
        "num_layers": len({k.split(".")[1] for k in sd if k.startswith("ssd_layers.")}),
        "d_state": int((conv_dim - d_inner) // 2),
        "d_conv": int(d_conv),
        "expand": int(d_inner // d_model),
        "head_dim": int(d_inner // heads),
        "is_time": is_time,
        "is_ffn": "ssd_layers.0.ffn.fc1.weight" in sd,
    }
    if d_inner % d_model:
        raise UserError(f"checkpoint d_inner={d_inner} is not a multiple of d_model={d_model}: not a TiM4Rec model")
    if is_time:
        kwargs["max_seq_len"] = int(sd["layer_norm_time.weight"].shape[0])
        gate = sd.get("ssd_layers.0.ssd.time_gate_residual.1.weight")
        kwargs["p2p_residual"] = bool(gate is not None and gate.shape[0] > 1)
    else:
        kwargs["p2p_residual"] = bool(_first(cfg, "p2p_residual") or False)
        length = _first(cfg, "MAX_ITEM_LIST_LENGTH", "max_seq_len")
        if length is not None:
            kwargs["max_seq_len"] = int(length)
    for ours, theirs, cast in (
        ("dropout", ("dropout_prob", "dropout"), float),
        ("time_dropout", ("time_drop_out", "time_dropout"), float),
        ("chunk_size", ("chunk_size",), int),
        ("kaiming_init", ("kaiming_init",), bool),
    ):
        value = _first(cfg, *theirs)
        if value is not None:
            kwargs[ours] = cast(value)
    eps = _first(cfg, "norm_eps")
    if eps is None:
        warnings.warn("checkpoint config has no norm_eps (not recoverable from weights): using 1e-12", stacklevel=2)
    else:
        kwargs["norm_eps"] = float(eps)
    activation = _first(cfg, "conv_activation")
    if activation is not None:
        kwargs["conv_activation"] = str(activation)
    elif heads % 8 == 0:  # the reference switches to SiLU only when H % 8 == 0 and causal_conv1d is installed
        warnings.warn(
            f"the reference used SiLU after the xBC conv if `causal_conv1d` was installed (H={heads} is a multiple "
            "of 8); assuming hardswish: pass conv_activation='silu' if that model was trained with it",
            stacklevel=2,
        )
    return kwargs


# ---------------------------------------------------------------------------------------------- loading


def _check_state_dict(network: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """UserError naming the first missing, mis-shaped or unexpected key (in the network's key order). Reference
    time-path names are read as the network's (as `load_state_dict` does, `time_path.upgrade_state_dict`)."""
    expected = network.state_dict()
    if isinstance(network, TiM4Rec):
        state = dict(state)
        upgrade_state_dict(state)
    hint = "build the network with the checkpoint's hyperparameters (num_layers, is_time, max_seq_len, d_model ...)"
    for key, value in expected.items():
        if key not in state:
            raise UserError(f"{source}: key {key!r} is missing from the checkpoint; {hint}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(
                f"{source}: {key!r} has shape {tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} "
                f"in the network; {hint}"
            )
    for key in state:
        if key not in expected:
            raise UserError(f"{source}: unexpected key {key!r} in the checkpoint; {hint}")


def load_recbole_checkpoint(path: str | os.PathLike, **overrides: Any) -> TiM4Rec:
    """Build a TiM4Rec from a reference checkpoint and load its weights strictly.

    Args:
        path: the reference `.pth` file.
        **overrides: TiM4Rec constructor arguments that win over the checkpoint (e.g. ssd_backend="torch").

    Returns:
        The network in eval mode.
    """
    state, config = read_recbole_checkpoint(path)
    kwargs = tim4rec_kwargs_from_checkpoint(state, config)
    kwargs.update(overrides)
    try:
        network = TiM4Rec(**kwargs)
    except TypeError as err:
        raise UserError(f"bad TiM4Rec override for {os.fspath(path)!r}: {err}") from None
    _check_state_dict(network, state, os.fspath(path))
    network.load_state_dict(state, strict=True)
    return network.eval()


def load_network_weights(network: nn.Module, path: str | os.PathLike, option: str = "checkpoint") -> None:
    """Load weights into an existing network, strictly: a reference `.pth` or a tim4rec-pl Lightning `.ckpt`.

    Lightning checkpoints prefix the network's keys with `network.` (and `_orig_mod.` under torch.compile);
    both prefixes are stripped. A missing, mis-shaped or unexpected key raises a UserError naming it.
    """
    path = os.fspath(path)
    state, _ = read_recbole_checkpoint(path, option)
    if any(k.startswith("network.") for k in state):
        state = {k[len("network.") :]: v for k, v in state.items() if k.startswith("network.")}
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    target = getattr(network, "_orig_mod", network)  # a torch.compile'd network shares its parameters
    _check_state_dict(target, state, f"{option} {path}")
    target.load_state_dict(state, strict=True)
