"""Data echoing: another step on the last batch while the next one is still being drawn.

On a GPU the bundled model's step is far shorter than the time the data workers need to draw a batch of
scenes (bench/synth_data_rate.py: one worker draws and encodes one image per few milliseconds of CPU time;
a batch of 128 through a 3M-parameter model is a few tens of milliseconds of GPU time), so the GPU would
mostly wait. Repeating a batch is worth less than a new one but more than nothing (Choi et al., "Faster
Neural Network Training with Data Echoing", 2019), so a batch is repeated only when the next is not ready,
and at most `times` steps use any one batch: where the data keeps up, nothing is repeated.
"""

from __future__ import annotations

import queue
import threading


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class EchoingBatches:
    """An iterator over `source`'s batches (drawn on a background thread, two kept ready) that yields the
    last batch again, up to `times` uses in all, whenever the next one has not arrived yet. `echoed` counts
    the repeats. An error in `source` is raised here, at the next batch it would have given."""

    def __init__(self, source, times: int):
        if times < 1:
            raise ValueError(f"echo must be at least 1, got {times}")
        self.times, self.echoed = times, 0
        self._ready: queue.Queue = queue.Queue(maxsize=2)
        self._last, self._uses = None, 0
        threading.Thread(target=self._fill, args=(source,), daemon=True, name="echo-batches").start()

    def _fill(self, source) -> None:
        try:
            for batch in source:
                self._ready.put(batch)
        except BaseException as e:            # handed to the training thread, which raises it
            self._ready.put(_Failed(e))
        else:
            self._ready.put(_Failed(StopIteration()))

    def __iter__(self) -> "EchoingBatches":
        return self

    def __next__(self):
        if self._last is not None and self._uses < self.times:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                self._uses += 1
                self.echoed += 1
                return self._last
        else:
            item = self._ready.get()
        if isinstance(item, _Failed):
            raise item.error
        self._last, self._uses = item, 1
        return item
