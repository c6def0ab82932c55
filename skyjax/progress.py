"""One progress bar per job (rows done of rows total, rows/s, ETA), shared by `score`, `eval` and `generate`.

    bar = JobProgress(total=len(rows), desc="score")
    for batch in batches:
        with bar.step(shape=(rows, length)):   # "compiling" shows while the first batch of a new shape runs
            run(batch)
        bar.update(len(batch))
    bar.close()

A job draws exactly one bar, however many batches or shapes it has; messages printed during the job go through
`bar.write` so they do not tear the bar. `compiles` counts the new shapes seen (each is one compiled program).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Hashable, TextIO


class JobProgress:
    def __init__(self, total: int, desc: str, *, unit: str = "row", initial: int = 0, enabled: bool = True,
                 file: TextIO | None = None):
        self.desc, self.compiles, self._shapes = desc, 0, set()
        self._file = file if file is not None else sys.stderr
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self._file, mininterval=0.5,
                             dynamic_ncols=True, smoothing=0.1)

    @contextlib.contextmanager
    def step(self, shape: Hashable):
        """Around one batch's call; while a shape not seen before compiles, the bar says so."""
        new = shape not in self._shapes
        if new:
            self._shapes.add(shape)
            self.compiles += 1
            if self._bar is not None:
                self._bar.set_description(f"{self.desc} (compiling {shape})", refresh=True)
        try:
            yield new
        finally:
            if new and self._bar is not None:
                self._bar.set_description(self.desc, refresh=False)

    def phase(self, desc: str) -> None:
        """Rename the bar for the next part of the job (e.g. "pairs: sample" then "pairs: score"); still one bar."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_description(self, desc: str) -> None:
        """A new label for the bar (a job of several stages names the one running)."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=True)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        """Text after the counts (e.g. the step and loss of a training stage); "" clears it."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=refresh)

    def write(self, message: str) -> None:
        """Print a line above the bar (or plainly when there is no bar)."""
        if self._bar is not None:
            self._bar.write(message, file=self._file)
        else:
            print(message, file=self._file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "JobProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
