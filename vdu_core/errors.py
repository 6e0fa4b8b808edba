"""Typed errors of the library. Every refusal names what it refused and the rule it broke.

This module imports nothing heavy: the API imports it to turn library errors into 4xx answers.
"""

from __future__ import annotations


class VDUError(Exception):
    """Base class. ``code`` is a stable machine-readable name; ``field`` names the offending input."""

    code = "vdu_error"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "field": self.field}


class ConfigError(VDUError):
    """A method or evaluation parameter is unknown, of the wrong type or out of range."""

    code = "invalid_parameter"


class ForgetSetError(VDUError):
    """The forget set cannot be used: ``file`` names the member, ``rule`` the limit it broke."""

    code = "invalid_forget_set"

    def __init__(self, message: str, *, file: str | None = None, rule: str, field: str | None = "forget_set"):
        super().__init__(message, field=field)
        self.file = file
        self.rule = rule

    def to_dict(self) -> dict:
        return {**super().to_dict(), "file": self.file, "rule": self.rule}


class ModelLoadError(VDUError):
    """The model reference cannot be loaded safely (pickle, bad safetensors, wrong architecture...)."""

    code = "invalid_model"

    def __init__(self, message: str, *, rule: str = "invalid_model", field: str | None = "model"):
        super().__init__(message, field=field)
        self.rule = rule

    def to_dict(self) -> dict:
        return {**super().to_dict(), "rule": self.rule}


class Cancelled(VDUError):
    """The caller's cancel callback asked the loop to stop."""

    code = "cancelled"


class ModelCollapsed(VDUError):
    """Unlearning destroyed the model (every sample drawn as one class, quality gone).

    Collapse is a failure, never counted as forgetting.
    """

    code = "model_collapsed"
