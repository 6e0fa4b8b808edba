"""Domain errors of the service layer. The API maps each to one RFC 9457 problem."""

from __future__ import annotations


class ServiceError(Exception):
    """Base: ``status`` is the HTTP status the API answers with, ``code`` a stable name."""

    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, message: str, *, field: str | None = None, **extra):
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra


class NotFound(ServiceError):
    status = 404
    code = "not_found"
    title = "Not found"

    def __init__(self, resource: str, resource_id: str, *, field: str | None = None):
        super().__init__(f"{resource} {resource_id!r} not found", field=field)
        self.resource = resource
        self.resource_id = resource_id


class InvalidInput(ServiceError):
    status = 422
    code = "invalid_input"
    title = "Invalid input"


class Conflict(ServiceError):
    status = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"


class StorageError(ServiceError):
    """Storage refused a read or a write (disk full, read-only, S3 unreachable)."""

    status = 503
    code = "storage_unavailable"
    title = "Storage unavailable"
