"""The one thread that does a program's MLX work, for the chat engine and the server.

MLX work of one model must stay on one thread, in order. :class:`MLXThread` runs jobs
one at a time from a queue; a cancelled job that has not started leaves the queue (it is
not counted as waiting, and never runs), and one that has started stops at its next
:meth:`Job.check` (the prefill checks between chunks). When the thread ends it frees its
MLX streams itself (``mx.clear_streams()``): left to interpreter exit, MLX aborts
("terminate called without an active exception").
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import mlx.core as mx


class Cancelled(Exception):
    """A job stopped at a check because it was cancelled."""


class Job:
    """One unit of MLX work: ``run(job)``, which may call :meth:`check` as it goes."""

    def __init__(self, run: Callable[["Job"], None]):
        self.run = run
        self.cancelled = threading.Event()

    def cancel(self):
        """Stop it: a waiting job never starts, a running one stops at its next check."""
        self.cancelled.set()

    def check(self, *_):
        """Raise :class:`Cancelled` if the job was cancelled (takes and ignores a progress
        callback's arguments, so it can be one)."""
        if self.cancelled.is_set():
            raise Cancelled


class MLXThread:
    """A thread that runs :class:`Job` s in the order they were submitted."""

    def __init__(self, name: str, on_exit: Callable[[], None] | None = None):
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._on_exit = on_exit
        self._running: Job | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Job], None]) -> Job:
        job = Job(run)
        self._jobs.put(job)
        return job

    @property
    def waiting(self) -> int:
        """Jobs queued and not cancelled."""
        with self._jobs.mutex:
            return sum(1 for job in self._jobs.queue if job is not None and not job.cancelled.is_set())

    def close(self, cancel: bool = False, timeout: float | None = None):
        """End the thread once the jobs queued so far are done (with ``cancel``: cancelled,
        the running one at its next check), waiting up to ``timeout`` seconds."""
        if cancel:
            with self._jobs.mutex:
                queued = [job for job in self._jobs.queue if job is not None]
            for job in [self._running, *queued]:
                if job is not None:
                    job.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _loop(self):
        try:
            while (job := self._jobs.get()) is not None:
                if job.cancelled.is_set():
                    continue
                self._running = job
                try:
                    job.run(job)
                except Cancelled:
                    pass
                finally:
                    self._running = None
        finally:
            if self._on_exit is not None:
                self._on_exit()
            mx.clear_streams()
