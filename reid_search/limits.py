"""Defaults and limits that the library and the command line share.

Free of heavy imports (torch, faiss, FastAPI, SQLAlchemy) so that the CLI can
build its options, and answer ``--help``, without loading them.
"""

from __future__ import annotations

# ---- ONNX export (reid_search.onnx_model)

# The torch.export-based exporter emits opset 18 natively; converting down to
# 17 fails on ReduceMean/Reshape axes, so 18 is the floor.
MIN_OPSET = 18
DEFAULT_OPSET = 18
VERIFY_MAX_IMAGES = 32  # images an export is checked on against PyTorch

# ---- HTTP service (reid_search.app.service)

API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = "REID_SEARCH_API_KEY"
MAX_TOP_K = 1000
DEFAULT_TOP_K = 10
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Person crops are small; 4 MP (a 2560x1600 frame) leaves room for whole
# frames while keeping a full queue of decoded images in the low GBs.
DEFAULT_MAX_PIXELS = 4_000_000
DEFAULT_MAX_FILES = 32
DEFAULT_MAX_QUEUE = 256

# ---- gallery index types (indexer.spec)

INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw", "ivfsq8", "diskann")  # the last two: the Milvus store only

# ---- gallery fields

# A track id's longest length in characters, everywhere: the manifest check, the API's
# form fields, the SQL column (String(255)) and the Milvus VARCHAR field.
MAX_TRACK_CHARS = 255
# pid and camid are 32-bit integer columns in the metadata DB.
MAX_LABEL = 2**31 - 1
MIN_PID = -1  # -1 junk, 0 distractor (Market-1501)
