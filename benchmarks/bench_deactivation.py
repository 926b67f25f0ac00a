"""Deactivation trials per second: batched block replay against one forward pass per trial.

    .venv/bin/python benchmarks/bench_deactivation.py [--pack smollm2-135m-demo --layer 5 --trials 60]

Takes a stored pack (ingested; the connection from the usual settings) and one
target layer. For `trials` removals of single active predecessors at sampled
tokens it measures, in the same run:
  baseline  the model run on the window (cut after the token) with the removal
            made by a hook, one trial per forward pass (flowdb before batching);
  batched   flowdb's BlockReplay: block L alone on the recorded inputs, every
            removal a row of one call.
Both give R_L at the token; the script checks they agree and prints trials/s
and the speed-up.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    import torch

    from flowdb.analysis.deactivation import BlockReplay
    from flowdb.analysis.pack_model import feature_directions, open_pack
    from flowdb.lm.hooks import capture, hook_point, intervene
    from flowdb.lm.loader import load_model
    from flowdb.lm.texts import sample_tokens
    from flowdb.store.connection import connect

    parser = argparse.ArgumentParser()
    parser.add_argument("--pack", default="smollm2-135m-demo")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    with connect() as db:
        pack = open_pack(db, args.pack)
    model, tokenizer = load_model(pack.model)
    rng = np.random.default_rng(0)
    windows, positions = sample_tokens(tokenizer, "mixed", 32, 64, 2, 0, rng)
    started = time.perf_counter()
    replay = BlockReplay(model, args.layer, windows)
    clean_s = time.perf_counter() - started
    places = ["res", "mlp", "att"]
    saes = {p: pack.sae(args.layer - 1 if p == "res" else args.layer, p) for p in places}
    directions = {p: feature_directions(sae).numpy() for p, sae in saes.items()}
    rows = []  # (window, position, place, delta)
    while len(rows) < args.trials:
        w = int(rng.integers(len(windows)))
        p = int(positions[w, rng.integers(positions.shape[1])])
        place = places[len(rows) % 3]
        with torch.no_grad():
            codes = saes[place].encode(replay.activations[replay.hooks[place]][w, p]).numpy()
        active = np.flatnonzero(codes > 0)
        if len(active):
            j = int(rng.choice(active))
            rows.append((w, p, place, codes[j] * directions[place][j]))
    target = hook_point("res", args.layer)

    started = time.perf_counter()
    baseline = []
    for w, p, place, delta in rows:
        hook = hook_point(place, args.layer - 1 if place == "res" else args.layer)
        delta_t = torch.as_tensor(delta)

        def edit(h, p=p, delta_t=delta_t):
            h = h.clone()
            h[:, p] -= delta_t
            return h

        with torch.no_grad(), intervene(model, {hook: edit}), capture(model, [target]) as acts:
            model(windows[w:w + 1, :p + 1])
        baseline.append(acts[target][0, p])
    baseline_s = time.perf_counter() - started

    started = time.perf_counter()
    deltas = {place: np.zeros((len(rows), 576), dtype=np.float32) for place in places}
    for n, (_, _, place, delta) in enumerate(rows):
        deltas[place][n] = delta
    batched = replay.run([r[0] for r in rows], [r[1] for r in rows], deltas)
    batched_s = time.perf_counter() - started

    error = float((torch.stack(baseline) - batched).abs().max())
    print(f"pack {args.pack}, layer {args.layer}, {len(rows)} single-feature removals (R, M, A in turn)")
    print(f"baseline (one forward pass per trial): {baseline_s:7.2f} s  {len(rows) / baseline_s:8.1f} trials/s")
    print(f"batched block replay:                  {batched_s:7.2f} s  {len(rows) / batched_s:8.1f} trials/s")
    print(f"(batched also needs one clean pass per layer, shared by all its trials: {clean_s:.2f} s; with it "
          f"{len(rows) / (batched_s + clean_s):.1f} trials/s)")
    print(f"speed-up: {baseline_s / batched_s:.1f}x; largest difference in R_{args.layer}: {error:.2e}")


if __name__ == "__main__":
    main()
