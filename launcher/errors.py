"""Errors that reach HTTP clients, each with TGI's status code and ``error_type``."""

from __future__ import annotations


class InferError(Exception):
    """Base class: ``to_json`` gives TGI's ``{"error", "error_type"}`` body."""

    status: int = 500
    error_type: str = "incomplete_generation"

    def to_json(self) -> dict[str, str]:
        return {"error": str(self), "error_type": self.error_type}


class ValidationError(InferError):
    status = 422
    error_type = "validation"


class BadRequestError(InferError):
    """The body is not JSON at all (axum answers such bodies with 400)."""

    status = 400
    error_type = "validation"


class TemplateError(InferError):
    status = 422
    error_type = "template_error"

    def __init__(self, message: str) -> None:
        super().__init__(f"Template error: {message}")


class ToolError(InferError):
    status = 422
    error_type = "tool_error"

    def __init__(self, message: str) -> None:
        super().__init__(f"Tool error: {message}")


class GenerationError(InferError):
    status = 424
    error_type = "generation"

    def __init__(self, message: str) -> None:
        super().__init__(f"Request failed during generation: {message}")


class OverloadedError(InferError):
    status = 429
    error_type = "overloaded"

    def __init__(self, message: str = "Model is overloaded") -> None:
        super().__init__(message)


class IncompleteGenerationError(InferError):
    status = 500
    error_type = "incomplete_generation"

    def __init__(self, message: str = "Incomplete generation") -> None:
        super().__init__(message)


class IncompleteGenerationStreamError(InferError):
    status = 500
    error_type = "incomplete_generation_stream"

    def __init__(self, message: str = "Incomplete generation stream") -> None:
        super().__init__(message)


class ClientError(Exception):
    """A shard RPC failed; ``str()`` reads like the Rust router's ``ClientError``."""

    def __init__(self, message: str, *, connection: bool = False) -> None:
        prefix = "Could not connect to server" if connection else "Server error"
        super().__init__(f"{prefix}: {message}")
        self.connection = connection


class LauncherError(Exception):
    """Fatal startup/runtime error of the launcher: printed, then exit code 1."""
