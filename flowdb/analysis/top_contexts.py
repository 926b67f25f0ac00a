"""Offline labels: each feature's top-activating contexts over a text corpus, stored as
explanations of type "top-contexts" (typeName), beside any Neuronpedia labels.

Description: the tokens the feature fires on most, most frequent first, then its
strongest context with the token in [brackets], e.g.
    'import, from | "os.path\\n[import] sys"'
Score: the share of the top contexts whose token is the most frequent one (1.0: the
feature is about one token; low: no single token explains it). A feature's label
is its highest-scoring explanation, so a Neuronpedia label with a score wins where
both exist.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from flowdb.analysis.specs import ContextsSpec
from flowdb.errors import FlowdbError
from flowdb.modules import feature_key
from flowdb.progress import disabled
from flowdb.store import graph
from flowdb.store.database import Database

TYPE_NAME = "top-contexts"


@dataclass
class ContextsReport:
    saes: int = 0
    explanations: int = 0
    silent: int = 0  # features that never fired on the corpus


def _describe(tokenizer, windows, hits: list[tuple[float, int, int]]) -> tuple[str, float]:
    words = [tokenizer.decode([int(windows[w, p])]).strip() or repr(tokenizer.decode([int(windows[w, p])]))
             for _, w, p in hits]
    counts = Counter(words)
    top_words = [word for word, _ in counts.most_common(3)]
    _, w, p = hits[0]
    before = tokenizer.decode(windows[w, max(1, p - 8):p].tolist())
    after = tokenizer.decode(windows[w, p + 1:p + 3].tolist())
    example = f"{before}[{tokenizer.decode([int(windows[w, p])])}]{after}".replace("\n", "\\n")
    score = counts.most_common(1)[0][1] / len(hits)
    return f'{", ".join(top_words)} | "{example.strip()}"', score


def label_with_contexts(db: Database, pack_name: str, spec: ContextsSpec = ContextsSpec(),
                        model_and_tokenizer=None, progress=None) -> ContextsReport:
    """Store top-contexts explanations for every feature of every SAE of the pack; each
    SAE's explanations and labels are written in one transaction."""
    import torch
    from tqdm.auto import tqdm

    from flowdb.analysis.pack_model import open_pack
    from flowdb.lm.hooks import capture, forward_until, hook_point
    from flowdb.lm.loader import load_model
    from flowdb.lm.texts import token_windows

    pack = open_pack(db, pack_name)
    model, tokenizer = model_and_tokenizer or load_model(pack.model)
    windows = token_windows(tokenizer, spec.texts, spec.windows, spec.context, spec.seed)
    slots = [(layer, module) for layer in pack.layers for module in ("res", "mlp", "att") if pack.has(layer, module)]
    hooks = {slot: hook_point(slot[1], slot[0]) for slot in slots}
    best = {slot: None for slot in slots}  # slot -> (values [top, width], flat token ids [top, width])
    disable = disabled(progress)
    with torch.no_grad():
        for start in tqdm(range(0, len(windows), 16), desc="top contexts", disable=disable):
            chunk = windows[start:start + 16]
            with capture(model, list(hooks.values())) as acts:
                forward_until(model, chunk, max(layer for layer, _ in slots))
            # Token ids over the whole corpus, sink positions left out.
            ids = (torch.arange(start, start + len(chunk)).unsqueeze(1) * spec.context
                   + torch.arange(1, spec.context)).reshape(-1)
            for slot, hook in hooks.items():
                codes = pack.sae(*slot).encode(acts[hook][:, 1:].reshape(-1, acts[hook].shape[-1]))
                values = codes
                tokens = ids.unsqueeze(1).expand_as(codes)
                if best[slot] is not None:
                    values = torch.cat([best[slot][0], codes])
                    tokens = torch.cat([best[slot][1], tokens])
                top = values.topk(min(spec.top, len(values)), dim=0)
                best[slot] = (top.values, tokens.gather(0, top.indices))
    report = ContextsReport()
    flat = windows.numpy()
    for (layer, module), (values, tokens) in best.items():
        rows = []
        values, tokens = values.numpy(), tokens.numpy()
        for index in range(values.shape[1]):
            fired = values[:, index] > 0
            if not fired.any():
                report.silent += 1
                continue
            hits = [(float(v), int(t) // spec.context, int(t) % spec.context)
                    for v, t in zip(values[fired, index], tokens[fired, index])]
            description, score = _describe(tokenizer, flat, hits)
            key = feature_key(pack_name, layer, module, index)
            rows.append({"key": key, "id": f"flowdb-contexts/{key}", "description": description,
                         "modelId": pack.model, "source": f"{layer}-{pack_name}-{module}", "index": index,
                         "score": score, "typeName": TYPE_NAME, "explanationModelName": None, "authorId": None})
        graph.store_explanations(db, rows)
        report.saes += 1
        report.explanations += len(rows)
    return report


def clear_theme(label: str | None, score: float | None, min_score: float = 0.5) -> bool:
    """A top-contexts label names a clear theme when one word (3+ letters) explains most
    of the feature's strongest contexts."""
    if not label or score is None or score < min_score:
        return False
    word = label.split("|")[0].split(",")[0].strip()
    return len(word) >= 3 and word.isalpha()


def theme(label: str) -> str:
    """The theme a steering judge looks for: the label's tokens, without the example."""
    return label.split("|")[0].strip()


def pick_seeds(db, pack: str, n: int) -> list[tuple[str, str]]:
    """Seed features with a clear theme and a multi-layer flow graph: along the pack's
    longest translated chains (the `chains` query), the latest feature whose top-contexts
    label names one word, one seed per word. Returns (feature key, theme) pairs."""
    from flowdb.store.graph import best_explanations
    from flowdb.store.templates import run_template

    chains = run_template(db, "chains", {"pack": pack, "limit": 400})
    candidates = sorted({key for keys in chains["keys"] for key in keys[1:]})
    labelled = {row["key"]: row for row in best_explanations(db, candidates, TYPE_NAME)}
    seen_words, seeds = set(), []
    for keys in chains["keys"]:
        for key in reversed(keys[1:]):  # latest first: the most ancestors
            row = labelled.get(key)
            if row is None or not clear_theme(row["label"], row["score"]):
                continue
            word = theme(row["label"]).split(",")[0].strip().lower()
            if word not in seen_words:
                seen_words.add(word)
                seeds.append((key, theme(row["label"])))
            break
        if len(seeds) == n:
            break
    if not seeds:
        raise FlowdbError(f"no chain of pack {pack} ends in a feature with a clear top-contexts label; "
                          f"run `flowdb labels contexts {pack}` first")
    return seeds


def labelled_seeds(db, features: list[str]) -> list[tuple[str, str]]:
    """(feature key, theme) of each feature named (a key, Neuronpedia URL or MODEL/SOURCE/INDEX);
    the theme is "" where the feature has no label."""
    from flowdb.store.features import resolve_feature

    keys = [resolve_feature(db, feature.strip()) for feature in features]
    return [(key, theme(graph.feature_label(db, key) or "")) for key in keys]
