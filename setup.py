"""Only the compiled part of the package; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The scan's inner loop (exporter/index/_listing.c). Optional: without a C compiler the
        # install goes on and the scan runs its Python loop instead (the exporter logs which).
        Extension("exporter.index._listing", ["exporter/index/_listing.c"], optional=True),
    ]
)
