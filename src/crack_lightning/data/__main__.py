"""`python -m crack_lightning.data download|check ...`: the same as `crack-data`."""

from crack_lightning.data.cli import main

raise SystemExit(main())
