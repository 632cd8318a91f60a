"""The FAISS store backend: index types and files (:mod:`.index`), their build parameters (:mod:`.params`)
and the backend with its filter fields (:mod:`.backend`)."""
