"""`python -m meter.ledger --fd N --ledger PATH`: the DuckDB ledger process that
`ChildProcessStore` starts (see `child_store`).  Run from here, not as
`-m meter.ledger.child_store`, because the package imports that module first."""

from .child_store import main

main()
