"""The Milvus store backend, on ``pymilvus.MilvusClient`` (Milvus Lite or a server).

Modules: :mod:`.spec` (Milvus names of the index types and parameters), :mod:`.expr` (filters as
boolean expressions), :mod:`.client` (connecting, Lite quirks, log noise),
:mod:`.backend` (the :class:`~indexer.protocol.VectorBackend`), :mod:`.factory`
(what the coordinator opens versions with). ``pymilvus`` is imported when a
backend is opened, not with these modules, so the CLI can parse ``--store``
without loading it.
"""
