"""`python -m earthkamal_agent`: the same CLI as the `earthkamal-agent` script."""

from .cli import main

raise SystemExit(main())
