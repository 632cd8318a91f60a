"""The FAISS store backend: index types and files (:mod:`.index`) and the backend with its filter fields (:mod:`.backend`)."""
