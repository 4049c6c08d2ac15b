"""A sweep running in a background thread, so a page can draw its points as they come.

The app keeps one :class:`SweepJob` per session. The thread pulls points from
:func:`analysis.sweep.run_sweep` and appends them under a lock; the page reads
:meth:`SweepJob.snapshot` on every redraw. Cancelling sets a flag that the sweep checks
before each batch: the point in flight is dropped, every finished point stays (in the
job and in the cache). The model is only read, so the thread can share the cached model
with every other session.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace

from analysis.curves import Point
from analysis.errors import TokenScopeError
from analysis.imagesets import ImageSet
from analysis.models import LoadedModel
from analysis.sweep import SweepPlan, measure_throughput, run_sweep
from analysis.sweep_cache import SweepCache


@dataclass(frozen=True)
class JobState:
    """What a page needs to draw a sweep in progress."""

    points: tuple[Point, ...]
    planned: int
    images_done: int  # images of the point in flight
    images_total: int
    running: bool
    cancelled: bool
    error: str
    seconds: float
    notices: tuple[str, ...] = ()  # e.g. the GPU ran out of memory and the sweep went on

    @property
    def fraction(self) -> float:
        """Progress from 0 to 1, counting the point in flight by its images."""
        if not self.planned:
            return 1.0
        partial = self.images_done / self.images_total if self.images_total else 0.0
        return min(1.0, (len(self.points) + (partial if self.running else 0.0)) / self.planned)


class SweepJob:
    """Runs one sweep in a daemon thread; safe to read from any thread."""

    def __init__(
        self,
        model: LoadedModel,
        images: ImageSet,
        plan: SweepPlan,
        metrics: Sequence[str],
        *,
        batch_size: int = 8,
        precision: str = "fp32",
        cache: SweepCache | None = None,
        throughput: bool = False,
    ) -> None:
        self.model, self.images, self.plan = model, images, plan
        self.metrics = tuple(metrics)
        self.batch_size, self.precision, self.cache = batch_size, precision, cache
        self.throughput = throughput
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._points: list[Point] = []
        self._images_done = 0
        self._error = ""
        self._notices: list[str] = []
        self._started = 0.0
        self._finished: float | None = None
        self._thread = threading.Thread(target=self._work, name="tokenscope-sweep", daemon=True)

    def start(self) -> SweepJob:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the sweep ends; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self) -> JobState:
        with self._lock:
            end = self._finished if self._finished is not None else time.perf_counter()
            return JobState(
                points=tuple(self._points),
                planned=len(self.plan.points),
                images_done=self._images_done,
                images_total=len(self.images),
                running=self._thread.is_alive(),
                cancelled=self._stop.is_set(),
                error=self._error,
                seconds=end - self._started if self._started else 0.0,
                notices=tuple(self._notices),
            )

    def _advance(self, count: int) -> None:
        with self._lock:
            self._images_done += count

    def _notice(self, text: str) -> None:
        with self._lock:
            if text not in self._notices:
                self._notices.append(text)

    def _work(self) -> None:
        try:
            for point in run_sweep(
                self.model,
                self.images,
                self.plan,
                self.metrics,
                batch_size=self.batch_size,
                precision=self.precision,
                cache=self.cache,
                should_stop=self._stop.is_set,
                on_images=self._advance,
                on_notice=self._notice,
            ):
                with self._lock:
                    self._points.append(point)
                    self._images_done = 0
            if self.throughput and not self._stop.is_set():
                self._measure()
        except TokenScopeError as error:
            with self._lock:
                self._error = str(error)
        except Exception as error:  # shown on the page; the trace goes to the server log
            traceback.print_exc(file=sys.stderr)
            with self._lock:
                self._error = f"the sweep stopped on an unexpected error: {error}"
        finally:
            with self._lock:
                self._finished = time.perf_counter()

    def _measure(self) -> None:
        with self._lock:
            schedules = [point.schedule for point in self._points]
        speeds = measure_throughput(
            self.model,
            self.images,
            schedules,
            batch_size=self.batch_size,
            precision=self.precision,
        )
        with self._lock:
            self._points = [
                replace(point, images_per_second=speeds.get(point.schedule))
                for point in self._points
            ]


__all__ = ["JobState", "SweepJob"]
