"""Variational Diffusion Unlearning: the algorithm library (no web, no database, no Celery)."""

__version__ = "0.1.0"
