"""Tools that read the package's source to check its shape: the import graph and its
cycles (imports.py), the boundaries around storage backends and the codec (boundaries.py).
They parse files with ast and never import the modules they check.
"""
