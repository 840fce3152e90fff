"""`python -m exporter`: the same as `model-storage-exporter`."""

from exporter.cli import main

raise SystemExit(main())
