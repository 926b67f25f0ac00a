"""Real text that exists offline, named for the CLI's --texts option.

python-stdlib: the source (code, comments and docstrings) of the Python standard
library this interpreter ships, one sample per module file, in a seeded order.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from flowdb.errors import FlowdbError

if TYPE_CHECKING:
    import torch


def python_stdlib(seed: int) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    random.Random(seed).shuffle(files)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 2000:
            yield text


TEXTS = {"python-stdlib": python_stdlib}


def texts(name: str, seed: int = 0) -> Iterator[str]:
    if name not in TEXTS:
        raise FlowdbError(f"no text source named {name!r}; known: {', '.join(sorted(TEXTS))}")
    return TEXTS[name](seed)


def token_windows(tokenizer, name: str, n_windows: int, context: int, seed: int = 0) -> torch.Tensor:
    """n_windows token sequences of length context, one per text, from its start."""
    import torch

    windows = []
    for text in texts(name, seed):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= context:
            windows.append(ids[:context])
        if len(windows) == n_windows:
            return torch.tensor(windows)
    raise FlowdbError(f"text source {name} has only {len(windows)} texts of {context}+ tokens")



def sample_tokens(tokenizer, name: str, samples: int, context: int, per_sample: int, seed: int, rng):
    """Windows [samples, context] (texts in seeded order) and, per window, per_sample
    distinct positions after the first (the attention sink), drawn from rng."""
    import numpy as np

    windows = token_windows(tokenizer, name, samples, context, seed)
    positions = np.stack([rng.choice(np.arange(1, context), per_sample, replace=False)
                          for _ in range(samples)])
    return windows, positions
