"""`python -m crack_lightning.data download|check ...`."""

from crack_lightning.data.cli import main

raise SystemExit(main())
