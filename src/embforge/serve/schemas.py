"""The request body of the OpenAI-compatible API, and the typed HTTP errors.

``POST /v1/embeddings`` takes the OpenAI body (``input``, ``model``, ``dimensions``,
``encoding_format``, ``user``) plus documented extensions:

- ``input_type``: ``"query"`` or ``"document"`` — the model's ``query``/``document`` prompt
  when it has one (no prompt otherwise);
- ``prompt_name``: any prompt name the model defines (see ``GET /v1/models``);
- ``instruction`` (free text) or ``task`` (a name of the served instruction table): the
  instruction goes through the model's ``instruction_template`` and becomes the query prompt,
  attended to and left out of pooling exactly as ``Embedder.encode`` does it; with
  ``input_type: "document"`` the documents get none;
- compact output: ``encoding_format`` also takes ``int8``, ``uint8``, ``binary`` and ``ubinary``
  (JSON integer lists, :mod:`embforge.quantization`); ``output_dtype`` (Voyage AI's name) with
  ``encoding_format: "base64"`` sends the same values as base64 of their packed bytes.

Every error the server answers with is an :class:`ApiError` carrying its HTTP status and
an OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from embforge.errors import EmbforgeError


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings`` (unknown fields are rejected, not ignored)."""

    model_config = ConfigDict(extra="forbid")

    # a string, a list of strings, one token-id list, or a list of token-id lists
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr
    encoding_format: Literal["float", "base64", "int8", "uint8", "binary", "ubinary"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    # extensions: which of the model's prompts to prepend
    input_type: Literal["query", "document"] | None = None
    prompt_name: StrictStr | None = None
    # extensions: a task instruction through the model's template (free text, or a task of the table)
    instruction: StrictStr | None = None
    task: StrictStr | None = None
    # extension: compact output values (with encoding_format "base64": their packed bytes)
    output_dtype: Literal["float", "int8", "uint8", "binary", "ubinary"] | None = None


# ---------------------------------------------------------------------------- errors
class ApiError(EmbforgeError):
    """An error answered to the client. Its message is shown verbatim: never put internals in it."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequestError(ApiError):
    status, code = 400, "invalid_request"


class AuthenticationError(ApiError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFoundApiError(ApiError):
    status, code = 404, "model_not_found"


class NotFoundError(ApiError):
    status, code = 404, "not_found"


class MethodNotAllowedError(ApiError):
    status, code = 405, "method_not_allowed"


class PayloadTooLargeError(ApiError):
    status, code = 413, "payload_too_large"


class OverloadedError(ApiError):
    """The queue is full: the client should retry after ``retry_after`` seconds."""

    status, type, code = 503, "server_error", "overloaded"
    retry_after: int = 1


class InternalError(ApiError):
    status, type, code = 500, "server_error", "internal_error"
