"""`python -m blip2_fast ...`: the same command line as the `blip2-fast` console script."""
from .cli import main

raise SystemExit(main())
