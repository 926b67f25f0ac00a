"""What notebooks call: query templates, guarded Cypher, link sets and the explorer inline.
`import flowdb` re-exports all of it."""


def query(name: str, db=None, timeout_s: float | None = None, **params):
    """Run a query template (see `flowdb query --list`); returns a pandas DataFrame.

    >>> flowdb.query("lineage", feature="gemma-2-2b-gemmascope-16k/24/res/14548", timeout_s=5)

    Without db, connects as the CLI does (NEO4J_* variables, else the managed server).
    timeout_s: stop the query after this many seconds (default $FLOWDB_QUERY_TIMEOUT, else 60).
    """
    from flowdb.store.connection import connect
    from flowdb.store.templates import run_template

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


def cypher(statement: str, db=None, timeout_s: float | None = None, **params):
    """Run raw Cypher read-only (the guard `flowdb cypher` applies without --write); returns a
    pandas DataFrame whose columns follow the statement's RETURN, with no rows too.

    >>> flowdb.cypher("MATCH (f:Feature {pack: $pack}) RETURN f.key AS key LIMIT 3", pack="planted")

    A write, LOAD CSV, or a procedure other than introspection is refused (ReadOnlyRefused).
    Without db, connects as flowdb.query does; timeout_s as there.
    """
    from flowdb.store import guard
    from flowdb.store.connection import connect
    from flowdb.store.templates import checked_timeout

    limit = checked_timeout(timeout_s)
    if db is not None:
        return guard.read_frame(db, statement, params, limit)
    with connect() as database:
        return guard.read_frame(database, statement, params, limit)


def link(a: str, b: str, db=None, name: str | None = None, replace: bool = False, **spec):
    """Link two packs that read the same space (as `flowdb link A B`; a manifest is ingested
    first); returns the shares of each category per layer and module, as a pandas DataFrame.
    >>> flowdb.link("gemma-2-2b-gemmascope-res-16k", "gemma-2-2b-gemmascope-res-65k", k=5)
    spec: k, t, rule, q_chance, modules (see flowdb.flow.link_spec.LinkSpec). Without db, connects
    as flowdb.query does."""
    from flowdb.flow.link_atlas import shares_table
    from flowdb.flow.link_spec import LinkSpec
    from flowdb.store.connection import connect
    from flowdb.store.ingest import stored_pack
    from flowdb.store.links import link_packs

    def run(database):
        packs = [stored_pack(database, side)[0] for side in (a, b)]
        return shares_table(link_packs(database, *packs, LinkSpec(**spec), name=name, replace=replace).records)

    if db is not None:
        return run(db)
    with connect() as database:
        return run(database)


