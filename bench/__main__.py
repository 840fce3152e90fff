"""Run every `bench/bench_*.py` module's `main()` in name order; exit non-zero if any returns a non-zero int.

A `main()` may return anything else (a dict of results, None): only an int other than 0 means "over budget".
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    failed = []
    here = Path(__file__).resolve().parent
    only = sys.argv[1:]  # optional names: `python -m bench bench_plan`
    for module in sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")):
        if only and module not in only:
            continue
        print(f"== {module}", flush=True)
        code = importlib.import_module(f"bench.{module}").main()
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            failed.append(module)
    if failed:
        print(f"over budget: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
