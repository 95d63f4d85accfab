"""``python -m clfpipe``: the CLI."""

from clfpipe.cli import main

raise SystemExit(main())
