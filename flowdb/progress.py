"""Progress bars for long work: shown on a terminal by default, on or off when asked."""

from __future__ import annotations

from collections.abc import Callable


def disabled(show_progress: bool | None) -> bool | None:
    """tqdm's `disable` for a show_progress flag: None shows bars only on a terminal."""
    return None if show_progress is None else not show_progress


def layer_bar(total: int, desc: str, show_progress: bool | None) -> Callable[[int], None]:
    """A progress callback per layer done."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="layer", desc=desc, disable=disabled(show_progress))

    def advance(_layer: int) -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return advance
