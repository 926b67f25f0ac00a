"""flowdb: SAE feature-flow graphs in Neo4j (Laptev et al., ICML 2025)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowdb")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from flowdb.errors import FlowdbError

__all__ = ["FlowdbError", "__version__"]
