"""flowdb labels: Neuronpedia exports and the API, and offline top-context labels."""

from __future__ import annotations

import click

from flowdb.analysis.specs import ContextsSpec
from flowdb.cli._common import connection_options, echo, open_db
from flowdb.lm.texts import TEXT_SOURCES


@click.group()
def labels():
    """Neuronpedia labels: import public exports, or fetch from the API."""


@labels.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--pack", help="Only join to this pack (default: every pack whose model and source match).")
@connection_options
def labels_import(path, pack, settings):
    """Join a Neuronpedia explanations export (directory or .jsonl/.jsonl.gz/.json) onto features."""
    from flowdb.store.graph import ensure_schema
    from flowdb.store.labels import import_labels

    with open_db(settings) as db:
        ensure_schema(db)
        report = import_labels(db, path, pack)
    echo(report.summary())


@labels.command("contexts")
@click.argument("pack")
@click.option("--texts", type=click.Choice(TEXT_SOURCES), default=ContextsSpec.texts, show_default=True)
@click.option("--windows", default=ContextsSpec.windows, show_default=True, type=click.IntRange(1),
              help="Windows of 64 tokens.")
@click.option("--top", default=ContextsSpec.top, show_default=True, type=click.IntRange(1),
              help="Contexts kept per feature.")
@click.option("--progress/--no-progress", default=None)
@connection_options
def labels_contexts(pack, texts, windows, top, progress, settings):
    """Label every feature of PACK offline by its top-activating contexts (typeName "top-contexts")."""
    from flowdb.analysis.top_contexts import label_with_contexts

    with open_db(settings) as db:
        report = label_with_contexts(db, pack, ContextsSpec(texts=texts, windows=windows, top=top),
                                     progress=progress)
    echo(f"{report.explanations} top-contexts explanations over {report.saes} SAEs of {pack}; "
         f"{report.silent} features never fired on the {windows} windows")


@labels.command("fetch")
@click.argument("pack")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1), help="At most this many features.")
@click.option("--module", type=click.Choice(["res", "mlp", "att"]), help="Only this module.")
@click.option("--rate", default=2.0, show_default=True, type=click.FloatRange(0.01, 50), help="Requests per second.")
@click.option("--api-url", help="API base (default: $NEURONPEDIA_API_URL or Neuronpedia's).")
@click.option("--deadline", default=30.0, show_default=True, type=click.FloatRange(0.5),
              help="Seconds one request may take in all, however slowly its answer arrives.")
@click.option("--retries", default=4, show_default=True, type=click.IntRange(0, 20),
              help="Retries of a 429 or 5xx answer (Retry-After honoured).")
@click.option("--progress/--no-progress", default=None)
@connection_options
def labels_fetch(pack, limit, module, rate, api_url, deadline, retries, progress, settings):
    """Fill missing labels of PACK from the Neuronpedia API (key: $NEURONPEDIA_API_KEY); resumable."""
    from flowdb.store.graph import ensure_schema
    from flowdb.store.labels import fetch_labels

    with open_db(settings) as db:
        ensure_schema(db)
        report = fetch_labels(db, pack, limit=limit, module=module, api_url=api_url,
                              requests_per_second=rate, progress=progress,
                              request_deadline_s=deadline, retries=retries)
    echo(report.summary())


COMMANDS = (labels,)
