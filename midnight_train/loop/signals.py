"""Stop signals and preemption: SIGTERM or SIGUSR1 (SLURM, Kubernetes: before preemption or the
time limit) lets the current optimiser step finish; its flag travels in the step's one reduction
of the losses, so every process stops after the same step; then a checkpoint is written and
``Preempted`` ends the run (the CLI exits with status 75, "preempted, resume with resume=auto").
A second signal exits at once. DataLoader workers are started with the stop signals blocked, so
a signal to a whole process group does not kill them."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

from midnight_train.loop.errors import RunError

# EX_TEMPFAIL (sysexits.h): "try again later". `accelerate launch` and torchrun report any failed
# process as status 1; the message says what happened in any case.
PREEMPTED_EXIT = 75
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(RunError):
    """A stop signal ended the run after a checkpoint; ``resume=auto`` continues it exactly."""

    exit_code = PREEMPTED_EXIT


class StopSignals:
    """SIGTERM / SIGUSR1 handling for one ``fit``: the first signal asks the loop to stop after
    the current optimiser step (the processes agree on that step, then a checkpoint is written);
    a second one exits at once, without a checkpoint (the last complete one stays intact).

    The handler only sets a flag (and writes one line with ``os.write``, safe in a handler).
    Handlers can only be installed in the main thread; elsewhere (a notebook's worker thread)
    signals keep their previous behaviour."""

    def __init__(self, announce: bool):
        self.received: str | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"\nmidnight-train: second signal ({name}) after {self.received}: "
                        f"exiting at once, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = name
        if self.announce:
            os.write(2, f"\nmidnight-train: {name}: stopping after this optimiser step with a "
                        f"checkpoint (a second signal exits at once)\n".encode())

    @contextlib.contextmanager
    def blocked(self):
        """The stop signals blocked for the calling thread (one that arrives meanwhile waits,
        then reaches the handler). Processes started inside (DataLoader workers) inherit the
        blocked mask and never see the stop signals: torchrun forwards SIGTERM to a worker's
        whole process group and SLURM signals every process of a job step, and a worker killed
        under a running step would end the run without a checkpoint. The training process
        stops its workers itself when it exits."""
        previous = None
        if self.usable():
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signums())
        try:
            yield
        finally:
            if previous is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def install(self) -> None:
        self._set(self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _set(self, handler) -> None:
        if not self.usable():
            return
        for signum in _stop_signums():
            previous = signal.signal(signum, handler)
            self._previous.setdefault(signum, previous)

    @staticmethod
    def usable() -> bool:
        return threading.current_thread() is threading.main_thread()


def _stop_signums() -> set[int]:
    return {getattr(signal, name) for name in STOP_SIGNALS}
