"""Experiments on a pack with its model: groups, validate (deactivation, curve, steering), steer."""

from __future__ import annotations

from dataclasses import replace

import click

from flowdb.analysis.specs import (
    COMPARISON,
    METHODS,
    SCHEDULES,
    STRATEGIES,
    DeactivationSpec,
    GenerationSpec,
    GroupsSpec,
    SteeringSpec,
)
from flowdb.cli._common import connection_options, echo, open_db
from flowdb.lm.texts import TEXT_SOURCES


@click.command()
@click.argument("pack")
@click.option("--texts", default=GroupsSpec.texts, show_default=True, help="Offline text source.")
@click.option("--samples", default=GroupsSpec.samples, show_default=True, type=click.IntRange(1))
@click.option("--tokens-per-sample", default=GroupsSpec.tokens_per_sample, show_default=True,
              type=click.IntRange(1, 127))
@click.option("--top-k", default=",".join(map(str, GroupsSpec.top_k)), show_default=True,
              help="Comma-separated k values (at most the pack's k).")
@click.option("--seed", default=GroupsSpec.seed, show_default=True, type=int)
@click.option("--out", type=click.Path(dir_okay=False), help="Also draw the per-layer shares (.png, .svg, .html).")
@click.option("--progress/--no-progress", default=None)
@connection_options
def groups(pack, texts, samples, tokens_per_sample, top_k, seed, out, progress, settings):
    """Activation-based groups of PACK's residual features on real text (stored on the graph)."""
    from flowdb.analysis.groups import GROUPS, activation_groups

    try:
        ks = tuple(int(k) for k in top_k.split(","))
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 1,5", param_hint="--top-k") from None
    spec = GroupsSpec(texts=texts, samples=samples, tokens_per_sample=tokens_per_sample, top_k=ks, seed=seed)
    with open_db(settings) as db:
        try:
            table = activation_groups(db, pack, spec, progress=progress)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--top-k") from None
    for k, part in table.groupby("top_k"):
        echo(f"top-{k}: share of active residual features per group")
        wide = part.pivot(index="layer", columns="group", values="share")[list(GROUPS)]
        echo(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    if out:
        from flowdb.views.plots import plot_groups

        plot_groups(table, out, pack)
        echo(f"wrote {out}")


@click.group()
def validate():
    """Causal checks of a pack's matches on its model."""


@validate.command("deactivation")
@click.argument("pack")
@click.option("--layers", help="Comma-separated target layers (default: two, at a third and two thirds of the pack).")
@click.option("--texts", type=click.Choice(TEXT_SOURCES), default=DeactivationSpec.texts, show_default=True)
@click.option("--samples", default=DeactivationSpec.samples, show_default=True, type=click.IntRange(1),
              help="Windows of 64 tokens.")
@click.option("--max-targets", default=DeactivationSpec.max_targets, show_default=True, type=click.IntRange(1),
              help="Active (token, target feature) pairs per layer.")
@click.option("--exhaustive/--no-exhaustive", default=DeactivationSpec.exhaustive, show_default=True,
              help="Also run the exhaustive search (one replay per active feature of each place).")
@click.option("--ceiling", is_flag=True,
              help="Also run the same trials with R_{L-1} read by R_L's own SAE (a feature's top-1 is itself): "
                   "the figures a matcher could reach if consecutive dictionaries shared their features.")
@click.option("--seed", default=DeactivationSpec.seed, show_default=True, type=int)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Also write the summary, with the pack's training tokens and quality (input of `validate curve`).")
@click.option("--out", type=click.Path(dir_okay=False), help="Also draw the results (.png, .svg, .html).")
@click.option("--progress/--no-progress", default=None)
@connection_options
def validate_deactivation(pack, layers, texts, samples, max_targets, exhaustive, ceiling, seed, csv_path, out,
                          progress, settings):
    """Table 1 of the paper: remove each matcher's predecessor at a token; does the target turn off?"""
    import time

    from flowdb.analysis.deactivation import deactivation_experiment, deactivation_report, pack_facts
    from flowdb.writes import atomic_write

    layer_list = None
    if layers:
        try:
            layer_list = tuple(int(x) for x in layers.split(","))
        except ValueError:
            raise click.BadParameter("comma-separated integers", param_hint="--layers") from None
    spec = DeactivationSpec(layers=layer_list, texts=texts, samples=samples, max_targets=max_targets,
                            exhaustive=exhaustive, ceiling=ceiling, seed=seed)
    timings: list = []
    started = time.perf_counter()
    with open_db(settings) as db:
        trials = deactivation_experiment(db, pack, spec, progress=progress, timings=timings)
        facts = pack_facts(db, pack)
    if trials.empty:
        raise click.ClickException("no eligible (target, active predecessor) pairs at these layers")
    report = deactivation_report(trials, ceiling)
    for title, table in report.sections:
        echo(title)
        if table is not None:
            echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    overall = report.overall
    removals = sum(t["removals"] for t in timings)
    seconds = sum(t["seconds"] for t in timings)
    echo(f"{removals} removals in {seconds:.1f} s ({removals / max(seconds, 1e-9):.0f} per second, batched); "
         f"{len(trials)} matcher trials; {time.perf_counter() - started:.0f} s in all")
    if csv_path:
        with atomic_write(csv_path) as partial:
            overall.assign(pack=pack, **facts).to_csv(partial, index=False)
        echo(f"wrote {csv_path}")
    if out:
        from flowdb.views.plots import plot_deactivation

        plot_deactivation(overall, out, pack)
        echo(f"wrote {out}")


@validate.command("curve")
@click.argument("tables", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Picture (.png, .svg).")
def validate_curve(tables, out):
    """Success and activation change against training tokens and SAE quality, one point per
    `validate deactivation --csv` table (one per budget)."""
    import pandas as pd

    from flowdb.files import regular_file
    from flowdb.views.plots import plot_budget_curve

    table = pd.concat([pd.read_csv(regular_file(path, "table")) for path in tables], ignore_index=True)
    shown = table[table["matcher"].isin(["top-1", "random-active", "exhaustive"])]
    columns = ["pack", "train_tokens", "residual_ev", "residual_l0", "matcher", "trials", "success_rate",
               "success_lo", "success_hi", "activation_change"]
    echo(shown[[c for c in columns if c in shown]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    plot_budget_curve(table, out)
    echo(f"wrote {out}")


@validate.command("steering")
@click.argument("pack")
@click.option("--seeds", default="10", show_default=True,
              help="How many seed features to pick (clear themes, multi-layer flow graphs), or comma-separated keys.")
@click.option("--method", type=click.Choice(METHODS), default=SteeringSpec.method, show_default=True)
@click.option("--strengths", default="1,2,4,8,16", show_default=True,
              help="Comma-separated s (activation) or r (deactivation) values.")
@click.option("--generations", default=4, show_default=True, type=click.IntRange(1), help="Samples per grid point.")
@click.option("--max-new-tokens", default=COMPARISON.max_new_tokens, show_default=True, type=click.IntRange(1, 256))
@click.option("--prompt", default=COMPARISON.prompt, show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write every generation and score.")
@click.option("--out", type=click.Path(dir_okay=False), help="Plot score against strength per strategy (.png, .svg).")
@click.option("--progress/--no-progress", default=None)
@connection_options
def validate_steering(pack, seeds, method, strengths, generations, max_new_tokens, prompt, csv_path, out, progress,
                      settings):
    """The paper's steering comparison: the initial feature against single-layer and cumulative
    flow-graph sets, over a strength grid, scored by an offline proxy judge."""
    from flowdb.analysis.steering import (
        Steerer,
        compare,
        compare_summary,
        compare_verdict,
    )
    from flowdb.analysis.top_contexts import labelled_seeds, pick_seeds
    from flowdb.writes import atomic_write

    try:
        grid_values = [float(x) for x in strengths.split(",")]
    except ValueError:
        raise click.BadParameter("comma-separated numbers", param_hint="--strengths") from None
    with open_db(settings) as db:
        chosen = pick_seeds(db, pack, int(seeds)) if seeds.isdigit() else labelled_seeds(db, seeds.split(","))
        if any(not t for _, t in chosen):
            raise click.UsageError("every seed needs a label to take its theme from")
        echo(f"{len(chosen)} seeds: " + "; ".join(f"{key} ({t})" for key, t in chosen))
        steerer = Steerer(db, pack)
        base = SteeringSpec(seed_feature=chosen[0][0], method=method)
        generation = replace(COMPARISON, prompt=prompt, max_new_tokens=max_new_tokens)
        table = compare(steerer, chosen, base, generation, grid_values, generations, progress=progress)
    summary = compare_summary(table)
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    echo("proxy score (behaviour x coherence; a proxy for the paper's LLM judge), 95% bootstrap intervals:")
    echo(summary.to_string(index=False, float_format=fmt))
    echo("best score at mean coherence >= 0.5, and grid points within half of each strategy's peak:")
    echo(compare_verdict(summary).to_string(index=False, float_format=fmt))
    if csv_path:
        with atomic_write(csv_path) as partial:
            table.to_csv(partial, index=False)
        echo(f"wrote {csv_path}")
    if out:
        from flowdb.views.plots import plot_steering_comparison

        plot_steering_comparison(summary, out, f"{pack}: {method} steering, {len(chosen)} seeds x {generations} "
                                               "generations (proxy judge)")
        echo(f"wrote {out}")


@click.command()
@click.argument("pack")
@click.option("--seed-feature", required=True, help="PACK/LAYER/MODULE/INDEX of the feature to steer with.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=SteeringSpec.strategy, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=SteeringSpec.schedule, show_default=True)
@click.option("--method", type=click.Choice(METHODS), default=SteeringSpec.method, show_default=True)
@click.option("--s", "strength", default=SteeringSpec.s, show_default=True, type=float,
              help="Strength (activation steering).")
@click.option("--alpha", default=SteeringSpec.alpha, show_default=True, type=float,
              help="Exponential decay rate per layer.")
@click.option("--s-end", default=SteeringSpec.s_end, show_default=True, type=float,
              help="Linear schedule's final strength.")
@click.option("--r", default=SteeringSpec.r, show_default=True, type=float,
              help="Rescale factor (deactivation steering).")
@click.option("--layer", type=int, help="Layer l of single-layer/cumulative (default: the seed's).")
@click.option("--prompt", default=GenerationSpec.prompt, show_default=True)
@click.option("--max-new-tokens", default=GenerationSpec.max_new_tokens, show_default=True,
              type=click.IntRange(1, 1024))
@click.option("--top-p", default=GenerationSpec.top_p, show_default=True, type=click.FloatRange(0, 1))
@click.option("--temperature", default=GenerationSpec.temperature, show_default=True, type=click.FloatRange(0.01))
@click.option("--seed", default=GenerationSpec.seed, show_default=True, type=int)
@click.option("--theme", help="Theme text for the proxy score (default: the seed feature's label, if any).")
@click.option("--grid", "grid_strengths", help="Comma-separated strengths: score every strategy at each.")
@click.option("--out", type=click.Path(dir_okay=False), help="With --grid: plot score against strength.")
@connection_options
def steer(pack, seed_feature, strategy, schedule, method, strength, alpha, s_end, r, layer, prompt,
          max_new_tokens, top_p, temperature, seed, theme, grid_strengths, out, settings):
    """Generate with and without steering by the flow graph of a seed feature."""
    import textwrap

    from flowdb.analysis.steering import ProxyJudge, Steerer, grid

    spec = SteeringSpec(seed_feature=seed_feature, strategy=strategy, schedule=schedule, method=method,
                        s=strength, alpha=alpha, s_end=s_end, r=r, layer=layer)
    generation = GenerationSpec(prompt=prompt, max_new_tokens=max_new_tokens, top_p=top_p,
                                temperature=temperature, seed=seed)
    with open_db(settings) as db:
        from dataclasses import replace

        from flowdb.store.features import resolve_feature

        seed_feature = resolve_feature(db, seed_feature)
        spec = replace(spec, seed_feature=seed_feature)
        steerer = Steerer(db, pack)
        if theme is None:
            from flowdb.store.graph import feature_label

            theme = feature_label(db, seed_feature)
        if grid_strengths:
            if not theme:
                raise click.UsageError("--grid needs --theme (the seed feature has no label)")
            strengths = [float(x) for x in grid_strengths.split(",")]
            table = grid(steerer, spec, generation, theme, strengths)
            echo(table.drop(columns="text").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
            if out:
                from flowdb.views.plots import plot_steering_grid

                plot_steering_grid(table, out, f"{seed_feature}: proxy score vs strength ({schedule})")
                echo(f"wrote {out}")
            return
        result = steerer.steer(spec, generation)
    echo(f"steering with {len(result['features'])} feature(s) on layers "
         f"{sorted(set(result['features']['layer']))} ({strategy}, {schedule}, {method})")
    left, right = textwrap.wrap(result["default"], 44), textwrap.wrap(result["steered"], 44)
    echo(f"{'default':44} | steered")
    for i in range(max(len(left), len(right))):
        echo(f"{left[i] if i < len(left) else '':44} | {right[i] if i < len(right) else ''}")
    if theme:
        judge = ProxyJudge(steerer)
        reference = judge.perplexity(prompt, result["default"])
        for name in ("default", "steered"):
            scores = judge.score(prompt, result[name], theme, reference)
            echo(f"proxy score {name}: behaviour {scores['behaviour']:.3f} x coherence "
                 f"{scores['coherence']:.3f} = {scores['score']:.3f} (perplexity {scores['perplexity']:.1f})")


COMMANDS = (groups, validate, steer)
