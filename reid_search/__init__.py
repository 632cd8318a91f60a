"""reid-search: person re-identification retrieval."""

__version__ = "0.1.0"
