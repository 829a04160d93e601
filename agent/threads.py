"""The agent's executor for blocking work (``asyncio.to_thread``): one that a stop never waits on
forever.

asyncio's default executor is joined without a bound when the loop closes (``asyncio.run``), and its
threads again at interpreter exit: one copy blocked in the kernel (a FIFO swapped into a ``file://``
source, a hung network filesystem) would keep the agent alive after SIGTERM until the kubelet kills
it. Here each job runs in a daemon thread, and :meth:`BoundedExecutor.shutdown` waits for them at
most ``grace`` seconds; what is still blocked then is left to the process exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class BoundedExecutor(ThreadPoolExecutor):
    """Jobs in daemon threads (at most ``limit`` at once, as the default executor's pool);
    ``shutdown(wait=True)`` waits at most ``grace`` seconds in all. A ThreadPoolExecutor by type
    only (asyncio's ``set_default_executor`` requires one): none of its pool's threads is started."""

    def __init__(self, *, grace: float, limit: int = 32) -> None:
        super().__init__(max_workers=1)
        self.grace = grace
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")

        def run() -> None:
            try:
                with self._slots:  # waits in this thread, never in the event loop
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(*args, **kwargs))
                        except BaseException as e:  # handed to the awaiting task
                            future.set_exception(e)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name="modelcache-work", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if wait:
            deadline = time.monotonic() + self.grace
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
