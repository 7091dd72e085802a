"""Progress lines held back until a command really starts, so that a user error is the only line on stderr.

Lightning and tim4rec-pl log a few lines while a command is being set up (``Seed set to 42``, ``GPU available``,
the data summary); when the command then stops at a user error (a bad checkpoint, an unwritable predictions file,
a bad timestamp), those lines would surround the one-line error. ``tim4rec-pl``'s ``main`` holds them, with Python
warnings, from the start; :class:`ReleaseHeldOutput` (a callback the CLI always adds) prints them when fit /
validate / test / predict really begins, and ``main`` drops them when the command ends with a user error first.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch.callbacks import Callback

LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "tim4rec_pl")


class _Hold(logging.Handler):
    def __init__(self, held: HeldOutput, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self.held, self.handlers = held, handlers

    def emit(self, record: logging.LogRecord) -> None:
        self.held.items.append((self.handlers, record))


class HeldOutput:
    """Holds log records of :data:`LOGGERS` and Python warnings; :meth:`release` prints them, :meth:`discard` not."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, Any]] = []
        self._saved: list[tuple[logging.Logger, list[logging.Handler]]] = []
        self._showwarning: Any = None

    @property
    def holding(self) -> bool:
        return self._showwarning is not None

    def start(self) -> None:
        if self.holding:
            return
        self.items = []
        for name in LOGGERS:
            logger = logging.getLogger(name)
            if logger.handlers:
                self._saved.append((logger, list(logger.handlers)))
                logger.handlers = [_Hold(self, list(logger.handlers))]
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._hold_warning

    def _hold_warning(self, *args: Any, **kwargs: Any) -> None:
        self.items.append((None, (args, kwargs)))

    def _stop(self) -> Any:
        for logger, handlers in self._saved:
            logger.handlers = handlers
        self._saved = []
        show, self._showwarning = self._showwarning, None
        if show is not None:
            warnings.showwarning = show
        return show

    def release(self) -> None:
        """Stop holding and print what was held, in order."""
        if not self.holding:
            return
        show = self._stop()
        items, self.items = self.items, []
        for handlers, item in items:
            if handlers is None:
                args, kwargs = item
                show(*args, **kwargs)
            else:
                for handler in handlers:
                    if item.levelno >= handler.level:
                        handler.handle(item)

    def discard(self) -> None:
        """Stop holding and forget what was held."""
        if self.holding:
            self._stop()
        self.items = []


HELD = HeldOutput()


class ReleaseHeldOutput(Callback):
    """Prints the held lines once the checks are done and the loop starts."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        HELD.release()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        HELD.release()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        HELD.release()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        HELD.release()
