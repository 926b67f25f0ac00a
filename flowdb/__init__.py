"""flowdb: SAE feature-flow graphs in Neo4j (Laptev et al., ICML 2025)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowdb")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from flowdb.errors import FlowdbError


def query(name: str, db=None, timeout_s: float | None = None, **params):
    """Run a query template (see `flowdb query --list`); returns a pandas DataFrame.

    >>> flowdb.query("lineage", feature="gemma-2-2b-gemmascope-16k/24/res/14548", timeout_s=5)

    Without db, connects as the CLI does (NEO4J_* variables, else the managed server).
    timeout_s: stop the query after this many seconds (default $FLOWDB_QUERY_TIMEOUT, else 60).
    """
    from flowdb.database import connect
    from flowdb.queries import run_template

    if db is not None:
        return run_template(db, name, params, timeout_s=timeout_s)
    with connect() as database:
        return run_template(database, name, params, timeout_s=timeout_s)


def show(feature: str, db=None, **params):
    """A feature's flow graph drawn inline in Jupyter (the explorer's view, no server needed).

    >>> flowdb.show("planted/5/res/0", depth=4, max_rank=2)

    params: t_res, t_mod, max_rank, every_edge (as the flow-graph template) and depth
    (steps back and forward from the feature, default 3)."""
    from flowdb.explorer.notebook import show as show_flow

    return show_flow(feature, db, **params)


__all__ = ["FlowdbError", "__version__", "query", "show"]
