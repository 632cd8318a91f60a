"""The application layer: the workspace, the command line and the HTTP service.

Everything here may import core (:mod:`reid_search`), the store (:mod:`indexer`)
and the trainer (:mod:`trainer`); nothing below imports it (import-linter
contracts in ``pyproject.toml``).
"""
