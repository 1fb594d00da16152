"""python -m server: the prefd command line."""

from server.cli import main

raise SystemExit(main())
