"""Where one training run's time went, phase by phase: result.json's ``timings`` (a search reads them to say
where its trials' time went: ``experiments.queue``'s phases).

One object passed down the trainer and the program builder instead of a loose dict: seconds are added with
``timed`` or ``add``, labels (``program_cache`` "hit" / "miss", ...) set with ``note``, in the order they
happen, which is the order result.json lists them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class Timings:
    """Seconds per phase (``build_s``, ``train_compile_s``, ...) and a few labels, in insertion order."""

    def __init__(self, **values: Any) -> None:
        self._values: dict[str, Any] = dict(values)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's wall time to ``name`` (a phase may run several times: evaluations, checkpoints)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to ``name``'s total."""
        self._values[name] = self._values.get(name, 0.0) + seconds

    def note(self, **values: Any) -> None:
        """Set phases or labels outright (a phase measured elsewhere, ``program_store`` "hit")."""
        self._values.update(values)

    def default(self, name: str, value: Any) -> None:
        """Set ``name`` unless a phase already set it."""
        self._values.setdefault(name, value)

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def as_dict(self) -> dict[str, Any]:
        """result.json's ``timings``: seconds rounded to the millisecond, labels as they are."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self._values.items()}
