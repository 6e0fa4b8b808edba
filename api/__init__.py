"""The HTTP API (FastAPI). Imports ``jobs`` and torch-free parts of ``vdu_core``; never ``worker``
or torch (a test imports ``api.main`` in a fresh interpreter and checks)."""
