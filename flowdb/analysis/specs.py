"""The settings of each experiment, as typed frozen dataclasses: their defaults are the ones
the command line shows, and importing them costs nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("initial", "single-layer", "cumulative")
SCHEDULES = ("constant", "linear", "exponential")
METHODS = ("activation", "deactivation")


@dataclass(frozen=True)
class SteeringSpec:
    seed_feature: str
    strategy: str = "cumulative"
    schedule: str = "exponential"
    method: str = "activation"
    s: float = 3.0
    alpha: float = 0.25
    s_end: float = 1.0
    r: float = 0.0
    layer: int | None = None
    t_res: float | None = None  # None: the thresholds stored with the build
    t_mod: float | None = None


@dataclass(frozen=True)
class GenerationSpec:
    prompt: str = "I think that the biggest problem of contemporary theoretical physics is "
    max_new_tokens: int = 36
    top_p: float = 0.7
    temperature: float = 1.27
    seed: int = 0


@dataclass(frozen=True)
class GroupsSpec:
    texts: str = "python-stdlib"
    samples: int = 250
    tokens_per_sample: int = 5
    context: int = 128
    top_k: tuple[int, ...] = (1, 5)
    seed: int = 0


@dataclass(frozen=True)
class DeactivationSpec:
    layers: tuple[int, ...] | None = None  # None: two layers, at a third and two thirds of the pack
    texts: str = "mixed"
    samples: int = 64  # windows
    tokens_per_sample: int = 4
    context: int = 64
    max_targets: int = 200  # active (token, target feature) pairs per layer
    batch_rows: int = 128  # removals per call of the block
    exhaustive: bool = True  # costs a replay per active feature: off for dense SAEs when only the matchers matter
    ceiling: bool = False  # also run the ceiling control at place RES (trials with reading "ceiling")
    seed: int = 0


@dataclass(frozen=True)
class ContextsSpec:
    texts: str = "mixed"
    windows: int = 192
    context: int = 64
    top: int = 12  # contexts kept per feature
    seed: int = 7  # a text order other than the demo SAEs' training order (seed 0)


# The paper's steering comparison (flowdb validate steering): short generations after a neutral prompt.
COMPARISON = GenerationSpec(prompt="I think ", max_new_tokens=24)
