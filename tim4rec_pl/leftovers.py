"""Nothing left behind: the run files of a command that failed, and temporary folders of W&B.

* :class:`RunFiles` remembers what exists in the folders a ``validate`` / ``test`` / ``predict`` command may write
  to (its loggers' folders) before it starts; when the command fails, everything it added there is removed
  (``config.yaml``, a new ``version_N/`` or W&B run folder, a folder created for the run) and nothing that
  existed before is touched.
* W&B creates ``wandb-media`` and ``wandb-artifacts`` folders in the system temp folder when it is imported and
  removes them only at a clean exit. The CLI has them created inside a private folder of its process instead
  (``.tim4rec-pl.tmp-<host>-<pid>-...`` in the system temp folder, removed at exit; :func:`begin_private_temp`,
  :func:`isolate_wandb_temp`); the private folders of processes that were killed are removed at the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tim4rec_pl.atomic import TMP_MARK, remove_stale_temporaries, temporary_name

_PRIVATE_PREFIX = "tim4rec-pl"


# -------------------------------------------------------------------------------------------------- run files
def _walk(root: Path) -> dict[str, str | None]:
    """Every path under ``root`` (relative), with the target of symbolic links (None for files and folders)."""
    found: dict[str, str | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = os.readlink(path) if path.is_symlink() else None
    return found


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` of a parsed config node (a Namespace or a dict), None when missing."""
    if obj is None:
        return None
    return obj.get(key) if hasattr(obj, "get") else getattr(obj, key, None)


class RunFiles:
    """What a command may add to its loggers' folders, to take it away again if the command fails."""

    def __init__(self, roots: Iterable[str | os.PathLike], keep: Iterable[str | os.PathLike] = ()) -> None:
        """Remember ``roots``. Never removed: anything under ``keep`` (checkpoint folders, which these commands do
        not write but a ``fit`` running beside them may) and temporary files (another process's writes)."""
        self.existing: dict[Path, dict[str, str | None]] = {}  # root -> its contents before the command
        self.created: list[Path] = []  # the topmost folder of each root that did not exist yet
        self.keep = [Path(k).absolute() for k in keep]
        for root in dict.fromkeys(Path(r).absolute() for r in roots):
            if root.is_dir():
                self.existing[root] = _walk(root)
                continue
            top = root
            while not top.parent.exists() and top.parent != top:
                top = top.parent
            if not top.exists():
                self.created.append(top)

    @classmethod
    def from_trainer_config(cls, trainer: Mapping[str, Any] | Any) -> RunFiles:
        """The folders of the loggers in a parsed ``trainer:`` section (default logger: ``lightning_logs/``), keeping
        the folders of its checkpoint callbacks."""
        root = _get(trainer, "default_root_dir") or os.getcwd()
        logger, callbacks = _get(trainer, "logger"), _get(trainer, "callbacks") or []
        roots = []
        for item in logger if isinstance(logger, list) else [logger]:
            if item is None or item is True:
                roots.append(Path(root) / "lightning_logs")
            elif item is not False:
                roots.append(Path(_get(_get(item, "init_args"), "save_dir") or root))
        keep = [
            _get(_get(item, "init_args"), "dirpath")
            for item in (callbacks if isinstance(callbacks, list) else [callbacks])
        ]
        return cls(roots, [k for k in keep if k])

    def _kept(self, path: Path) -> bool:
        return TMP_MARK in path.name or any(path == k or k in path.parents for k in self.keep)

    def remove_new(self) -> None:
        """Remove what was added since this object was made; put back symbolic links that were re-pointed."""
        _finish_wandb()
        for top in self.created:
            if not any(k == top or top in k.parents for k in self.keep):
                shutil.rmtree(top, ignore_errors=True)
        for root, before in self.existing.items():
            if not root.is_dir():
                continue
            now = _walk(root)
            for rel in sorted(now, key=lambda r: r.count(os.sep)):  # outermost first: a new folder goes whole
                path = root / rel
                if self._kept(path) or any(k in path.parents for k in self.keep):
                    continue
                if rel not in before and any(k.is_relative_to(path) for k in self.keep):
                    continue  # a new folder that holds a checkpoint folder: its other new files go one by one
                if rel not in before:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    elif path.is_symlink() or path.exists():
                        with contextlib.suppress(OSError):
                            path.unlink()
                elif before[rel] is not None and now.get(rel) != before[rel]:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        path.symlink_to(before[rel])


def _finish_wandb() -> None:
    """End a W&B run of this process before its folder is removed (it would write into it at exit)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):
            wandb.finish(exit_code=1)


# -------------------------------------------------------------------------------------------------- W&B temp
_private: Path | None = None
_saved_tempdir: list[str | None] = []


def _private_dir() -> Path | None:
    """This process's private temp folder (created on first use), or None where the temp folder is not writable."""
    global _private
    if _private is None:
        system_tmp = tempfile.gettempdir()
        remove_stale_temporaries(system_tmp, prefix=f".{_PRIVATE_PREFIX}")  # those of killed processes
        private = Path(system_tmp) / temporary_name(_PRIVATE_PREFIX)
        try:
            private.mkdir(mode=0o700)
        except OSError:
            return None
        atexit.register(shutil.rmtree, private, True)
        _private = private
    return _private


def begin_private_temp() -> None:
    """Point ``tempfile`` at this process's private folder, while the CLI parses its config: parsing may import
    W&B (it resolves the logger's signature), which then creates its temp folders there."""
    private = _private_dir()
    _saved_tempdir.append(tempfile.tempdir)
    if private is not None:
        tempfile.tempdir = str(private)


def end_private_temp() -> None:
    """Back to the system temp folder (for everything else: compile caches, downloads ...)."""
    if _saved_tempdir:
        tempfile.tempdir = _saved_tempdir.pop()


def isolate_wandb_temp() -> None:
    """Import W&B (when installed and not imported yet) with its temp folders in the private folder."""
    if "wandb" in sys.modules:
        return
    try:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            return
    except (ImportError, ValueError):
        return
    begin_private_temp()
    try:
        import wandb  # noqa: F401  # creates its temp folders now, in the private folder
    except Exception:  # a broken W&B install: the logger reports it when it is used
        pass
    finally:
        end_private_temp()
