"""A second lane of work beside a flow's own: a generator run in its own thread, whose items the flow's thread
takes over whenever it looks (`ready`, without waiting; `rest`, to the end).

On a 2-core CPU one decode keeps about one core busy (a step is a chain of small matrix products), so two decodes
of two models side by side finish sooner than one after the other. The flow keeps the report and the event log to
itself: the lane only computes, and yields what it found as items (handlers) for the flow's thread to apply.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Lane(Generic[T]):
    """`make_work()` iterated in a thread named `name`, its items queued. A failure in the lane is raised in the
    flow's thread where it next looks; `close()` asks the lane to stop (`stopping()` turns true; the work checks it)
    and waits for its thread to end.

    `split_threads`: torch's N compute threads (per calling thread in torch's OpenMP build) are shared out while both
    threads compute, N // 2 to the flow's thread and the rest to the lane, instead of 2N threads on N cores, where
    each parallel region of a decode step waits for a thread the other lane has pushed off its core (on 2 idle
    cores Generate took a median 20.0 s against 21.1 s, six runs each, with less CPU time). Once the flow's thread
    waits for the lane (`rest`), the lane takes all N from its next item; once the lane has ended, the flow's thread
    takes them back."""

    def __init__(self, make_work: Callable[[], Iterator[T]], name: str, split_threads: bool = False):
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._alone = threading.Event()  # the flow's thread waits for the lane: it computes nothing meanwhile
        self._ended = False
        self._threads = torch.get_num_threads()
        self._flow_share = self._threads // 2  # the flow's thread's share while both compute; the lane has the rest
        self._split = split_threads and self._flow_share > 0
        if self._split:
            torch.set_num_threads(self._flow_share)
        self._thread = threading.Thread(target=self._pump, args=(make_work,), name=name, daemon=True)
        self._thread.start()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _pump(self, make_work: Callable[[], Iterator[T]]) -> None:
        work = None
        shared = self._split
        if shared:
            torch.set_num_threads(self._threads - self._flow_share)
        try:
            work = make_work()
            for item in work:
                self._items.put(item)
                if self._stop.is_set():
                    break
                if shared and self._alone.is_set():
                    torch.set_num_threads(self._threads)
                    shared = False
        except BaseException as exc:  # noqa: BLE001 - handed to the flow's thread, which raises it
            self._items.put(_Failed(exc))
        finally:
            close = getattr(work, "close", None)
            if close is not None:
                close()  # a generator left at a yield ends here, in this thread (its `finally` and `with` blocks)
            self._items.put(_END)

    def _take(self, wait: bool) -> Iterator[T]:
        while not self._ended:
            try:
                item = self._items.get(block=wait)
            except queue.Empty:
                return
            if item is _END:
                self._ended = True
                self._own_threads_back()
            elif isinstance(item, _Failed):
                self._ended = True
                self._own_threads_back()
                raise item.error
            else:
                yield item

    def ready(self) -> Iterator[T]:
        """The items the lane has yielded so far, without waiting."""
        return self._take(wait=False)

    def rest(self) -> Iterator[T]:
        """Every item still to come, waiting for each, to the lane's end (the lane takes every thread meanwhile)."""
        self._alone.set()
        return self._take(wait=True)

    def _own_threads_back(self) -> None:
        if self._split:
            torch.set_num_threads(self._threads)  # in the flow's thread: the lane has ended
            self._split = False

    def close(self) -> None:
        """Ask the lane to stop and wait for its thread (what it still held is dropped with it)."""
        self._stop.set()
        self._thread.join()
        self._own_threads_back()
