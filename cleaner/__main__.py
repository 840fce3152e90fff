"""`python -m cleaner`: the same as `model-storage-cleaner`."""

from cleaner.cli import main

raise SystemExit(main())
