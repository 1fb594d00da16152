"""python -m prefd_server: the prefd command line."""

from prefd_server.cli import main

raise SystemExit(main())
