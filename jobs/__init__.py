"""The job ledger shared by the API and the workers.

Settings, database session lifecycle, SQLAlchemy tables, the job state machine (``ledger``),
artifact storage (local disk or S3), team scoping and the queue publishers. Nothing here imports
a web framework, Celery tasks or torch: the API and the worker both build on it.
"""
