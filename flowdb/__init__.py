"""flowdb: SAE feature-flow graphs in Neo4j (Laptev et al., ICML 2025).

The package is laid out by pipeline stage, each importing only the stages below it:
packs -> flow (disk) -> store (Neo4j) -> analysis -> views -> explorer -> cli."""

from flowdb._version import __version__
from flowdb.api import cypher, link, query, show
from flowdb.errors import FlowdbError

__all__ = ["FlowdbError", "__version__", "cypher", "link", "query", "show"]
