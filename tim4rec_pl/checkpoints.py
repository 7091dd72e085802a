"""Checkpoint files: identified before they are used, and written atomically.

One rule for every checkpoint the tool reads (``--ckpt_path`` of fit / validate / test / predict, and
``--model.init_from``):

* a file that is not a PyTorch checkpoint (random bytes, a plain Python pickle, another archive) is refused
  without unpickling anything;
* a truncated or damaged checkpoint is refused, naming what is broken;
* a checkpoint is read with ``weights_only=True``: tensors and plain data only. Pickled Python objects are
  refused, and nothing in the file is run. The one exception is the ``config`` entry of a checkpoint written by the
  reference (RecBole) code, which ``--model.init_from`` reads as inert data (``tim4rec_pl.interop``);
* a checkpoint of another network, or of the same network with other shapes, is refused before anything runs,
  naming the first key that does not fit.

Each refusal is one line ``<option> <path>: <problem>; <fix>``. :class:`AtomicCheckpointIO` is the checkpoint
plugin the CLI installs in every Trainer: every save (ModelCheckpoint's best / last, the interrupt checkpoint,
``trainer.save_checkpoint``) goes through ``tim4rec_pl.atomic``, and every load through :func:`read_checkpoint`.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from tim4rec_pl.atomic import remove_stale_temporaries, write_bytes_atomically
from tim4rec_pl.errors import UserError
from tim4rec_pl.model.time_path import upgrade_state_dict

CKPT_FIX = "pass a .ckpt written by tim4rec-pl (best, last or its file path)"
INIT_FIX = "pass a .ckpt written by tim4rec-pl or a .pth written by the reference TiM4Rec code"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # torch.save's zip archive (an empty archive too)
_LEGACY_MAGIC = b"l\xfc\x9cF\xf9 j\xa8P\x19"  # the magic number that opens torch.save's pre-1.6 format


def _fix(option: str) -> str:
    return CKPT_FIX if option == "--ckpt_path" else INIT_FIX


def _container(path: str) -> str | None:
    """``zip`` / ``legacy`` for the two formats torch.save writes, ``pickle`` for a plain pickle, else None."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if _LEGACY_MAGIC in head:
        return "legacy"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= pickle.HIGHEST_PROTOCOL:
        return "pickle"
    return None


def _first_sentence(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0][:160]


def read_checkpoint(
    path: str | os.PathLike,
    option: str = "--ckpt_path",
    map_location: Any = "cpu",
    weights_only: bool = True,
    restricted_load: Callable[[str], Any] | None = None,
    is_inert_object: Callable[[Any], bool] | None = None,
) -> Any:
    """Load a checkpoint under the rule above, or raise a one-line UserError.

    Args:
        path: The file.
        option: Names the file in messages (``--ckpt_path``, ``--model.init_from``, ``checkpoint``).
        map_location: As for ``torch.load``.
        weights_only: False only when the user asked for full unpickling of a file they trust.
        restricted_load: For reference checkpoints: a loader that rebuilds pickled objects as inert stand-ins
            (never importing or running anything), used when safe loading meets a pickled object.
        is_inert_object: Tells the stand-ins ``restricted_load`` builds; they are accepted only under ``config``.
    """
    path = os.fspath(path)
    fix = _fix(option)
    if not os.path.isfile(path):
        raise UserError(f"{option} {path}: no such checkpoint file; {fix}")
    try:
        kind = _container(path)
    except OSError as err:
        raise UserError(
            f"{option} {path}: cannot read it ({err.strerror or err}); check the file's permissions"
        ) from None
    if kind is None or kind == "pickle":
        what = (
            "a plain Python pickle"
            if kind == "pickle"
            else "neither the zip archive torch.save writes nor its older format"
        )
        raise UserError(f"{option} {path}: not a PyTorch checkpoint ({what}; nothing in it was loaded); {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # the weights-only unpickler met bytes it cannot parse
            raise UserError(
                f"{option} {path}: the checkpoint file is damaged ({_first_sentence(err)}); {fix}"
            ) from None
        objects = found.group(1)
    except Exception as err:  # a truncated archive, a zip that is not a torch archive, an unreadable file ...
        raise UserError(
            f"{option} {path}: the checkpoint file is truncated or damaged ({_first_sentence(err)}); {fix}"
        ) from None
    refusal = UserError(
        f"{option} {path}: the checkpoint holds pickled Python objects ({objects}) that safe loading "
        f"(weights_only=True) refuses, and nothing in it was run; {fix}, or re-save the one you trust as tensors only"
    )
    if restricted_load is None:
        raise refusal
    try:
        obj = restricted_load(path)
    except Exception:  # the objects do more than hold data (a callable applied to arguments ...): refused
        raise refusal from None
    outside = {k: v for k, v in obj.items() if k != "config"} if isinstance(obj, Mapping) else obj
    if is_inert_object is not None and _contains(outside, is_inert_object):
        raise refusal
    return obj


def _contains(obj: Any, predicate: Callable[[Any], bool], depth: int = 0) -> bool:
    if predicate(obj):
        return True
    if depth > 20:
        return False
    if isinstance(obj, Mapping):
        return any(_contains(k, predicate, depth + 1) or _contains(v, predicate, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_contains(v, predicate, depth + 1) for v in obj)
    return False


def check_checkpoint_file(
    ckpt_path: str | None, module: torch.nn.Module | None = None, option: str = "--ckpt_path"
) -> None:
    """Refuse, before anything runs, a ``--ckpt_path`` file that is not a tim4rec-pl checkpoint of this network.

    ``None``, ``best`` / ``last`` left for Lightning to resolve, and remote URLs are not checked here (a local
    ``best`` / ``last`` is still read through :class:`AtomicCheckpointIO`). With ``module``, every key of its state
    dict must be in the checkpoint with the same shape, and the checkpoint may hold no other key.
    """
    if ckpt_path is None or ckpt_path in ("best", "last") or "://" in str(ckpt_path):
        return
    path = os.fspath(ckpt_path)
    ckpt = read_checkpoint(path, option)
    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or "pytorch-lightning_version" not in ckpt:
        hint = (
            "; a reference .pth is read with --model.init_from"
            if isinstance(state, Mapping)
            or (isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()))
            else ""
        )
        raise UserError(
            f"{option} {path}: not a training checkpoint of tim4rec-pl (no Lightning state){hint}; {CKPT_FIX}"
        )
    if module is None:
        return
    expected = module.state_dict()
    state = dict(state)
    upgrade_state_dict(state, prefix="network.")  # older checkpoints name the time path's parameters as the paper's
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        saved = ckpt.get("tim4rec_pl", {}).get("config", {}) if isinstance(ckpt.get("tim4rec_pl"), Mapping) else {}
        net = saved.get("model", {}).get("network", {}) if isinstance(saved, Mapping) else {}
        saved_class = net.get("class_path", "?").rsplit(".", 1)[-1] if isinstance(net, Mapping) else "?"
        here = type(getattr(module, "network", module)).__name__
        which = f"a {saved_class} network, this config builds {here}" if saved_class not in ("?", here) else (
            f"a {here} network of another size or variant")  # fmt: skip
        first = f"{missing[0]!r} missing" if missing else f"{unexpected[0]!r} unexpected"
        raise UserError(
            f"{option} {path}: checkpoint does not fit this config: it holds {which} ({len(missing)} keys missing, "
            f"{len(unexpected)} unexpected; first: {first}); use the config the checkpoint was trained with"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            data = ckpt.get("tim4rec_pl", {}).get("data", {}) if isinstance(ckpt.get("tim4rec_pl"), Mapping) else {}
            raise UserError(
                f"{option} {path}: checkpoint does not fit this config: {key} has shape {tuple(state[key].shape)} in "
                f"the checkpoint but {tuple(value.shape)} here (data checksum in checkpoint: {data.get('checksum')}); "
                "use the config and data the checkpoint was trained with"
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint plugin, with local saves through ``tim4rec_pl.atomic`` (a temporary file in the
    checkpoint's own folder, fsync, rename: a full disk leaves the previous checkpoint intact and a one-line error)
    and local loads through :func:`read_checkpoint` (one-line errors for damaged or foreign files)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a full disk then fails a plain file write, cleanly
        remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
        write_bytes_atomically(path, buffer.getbuffer(), what="checkpoint")

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        location = map_location if map_location is not None else "cpu"
        return read_checkpoint(path, "--ckpt_path", map_location=location, weights_only=weights_only is not False)
