"""tailmon: continuous tail-risk monitoring of deployed language models.

The subpackages live in top-level folders of the repository (``estimators/``, ``engines/``, ...)
and are mapped under this package by ``pyproject.toml``; always import them as ``tailmon.X``.
"""

__version__ = "0.1.0"
