"""`python -m flowdb.cli`, as the tests and a checkout without the entry point run it."""

from flowdb.cli import cli

cli()
