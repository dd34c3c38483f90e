"""Stop signals: SIGINT, SIGTERM and SIGUSR1 end a run cleanly after a checkpoint (exit code 130).

    llmkit pretrain pretrain/tiny      # Ctrl-C: saves, exits 130; run it again to resume
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """Turn SIGINT, SIGTERM and SIGUSR1 (Slurm's pre-timeout warning) into a flag checked between steps.

    A second SIGINT restores the default behaviour, so a stuck run can still be stopped at once.
    """

    NAMES = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
