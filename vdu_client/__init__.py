"""Python client of the VDU unlearning service (``vdu_client.Client``) and the ``vdu`` CLI."""

from vdu_client.client import Client, MultipartBody, RetryPolicy
from vdu_client.errors import APIError, ChecksumMismatch, TransportError, VDUClientError, WaitTimeout
from vdu_client.types import (
    Artifact,
    Download,
    Event,
    ForgetSet,
    Job,
    JobError,
    Model,
    Page,
    WebhookDelivery,
    WebhookSecret,
)

__all__ = [
    "APIError",
    "Artifact",
    "ChecksumMismatch",
    "Client",
    "Download",
    "Event",
    "ForgetSet",
    "Job",
    "JobError",
    "Model",
    "MultipartBody",
    "Page",
    "RetryPolicy",
    "TransportError",
    "VDUClientError",
    "WaitTimeout",
    "WebhookDelivery",
    "WebhookSecret",
]
