"""Real text that exists offline, named for the CLI's --texts option.

python-stdlib  the source (code, comments and docstrings) of the Python standard
               library this interpreter ships, one sample per module file
python-docs    English prose: the Python language reference and library topics
               that ship with the interpreter (pydoc_data.topics, about 110k tokens)
mixed          the two above, alternating (code and prose, as the paper mixed
               web text and Python code)
Every source yields its texts in a seeded order.
"""

from __future__ import annotations

import itertools
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


def python_docs(seed: int) -> Iterator[str]:
    from pydoc_data.topics import topics

    # Topics run to 40k characters; pieces of about 3k keep one long topic from
    # filling many consecutive windows.
    pieces = []
    for name in sorted(topics):
        paragraphs, piece = topics[name].split("\n\n"), ""
        for paragraph in paragraphs:
            piece += paragraph + "\n\n"
            if len(piece) > 3000:
                pieces.append(piece)
                piece = ""
        if len(piece) > 2000:
            pieces.append(piece)
    random.Random(seed).shuffle(pieces)
    yield from pieces


def mixed(seed: int) -> Iterator[str]:
    for pair in itertools.zip_longest(python_stdlib(seed), python_docs(seed)):
        yield from (text for text in pair if text is not None)


TEXTS = {"python-stdlib": python_stdlib, "python-docs": python_docs, "mixed": mixed}
TEXT_SOURCES = tuple(sorted(TEXTS))  # the names commands offer


def texts(name: str, seed: int = 0) -> Iterator[str]:
    if name not in TEXTS:
        raise FlowdbError(f"no text source named {name!r}; known: {', '.join(sorted(TEXTS))}")
    return TEXTS[name](seed)


def token_windows(tokenizer, name: str, n_windows: int, context: int, seed: int = 0,
                  per_text: int = 1) -> torch.Tensor:
    """n_windows token sequences of length context: up to per_text consecutive ones
    from the start of each text."""
    import torch

    windows = []
    for text in texts(name, seed):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for start in range(0, min(len(ids) - context + 1, per_text * context), context):
            windows.append(ids[start:start + context])
            if len(windows) == n_windows:
                return torch.tensor(windows)
    raise FlowdbError(f"text source {name} gives only {len(windows)} windows of {context} tokens "
                      f"({per_text} per text)")


def sample_tokens(tokenizer, name: str, samples: int, context: int, per_sample: int, seed: int, rng):
    """Windows [samples, context] (texts in seeded order) and, per window, per_sample
    distinct positions after the first (the attention sink), drawn from rng."""
    import numpy as np

    windows = token_windows(tokenizer, name, samples, context, seed)
    positions = np.stack([rng.choice(np.arange(1, context), per_sample, replace=False)
                          for _ in range(samples)])
    return windows, positions
