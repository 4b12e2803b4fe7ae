"""The one exception tree of Open-AutoGLM.

::

    AutoGLMError
     ├── ContractError        a wire message or manifest that breaks the contract
     │    │                   (malformed JSON, unknown schema/kind, wrong types, oversize)
     │    └── ImpersonationError  a device message naming another device than its topic
     ├── IntegrityError       bytes whose sha256 is not the one promised
     │    ├── SignatureError  a manifest unsigned, signed by an untrusted key, or tampered
     │    └── DowngradeError  a release older than one installed, not authorized as a rollback
     ├── ControlRejected      a desired state or command the device will not obey (unsigned,
     │                        untrusted key, altered, for another device, expired, replayed)
     ├── ConfigError          settings that fail validation at start-up
     ├── PackagingError       export, validation, quantization or quality check failed
     ├── RegistryError        a model or blob missing from (or clashing in) the registry
     ├── ModelLoadError       an ONNX model that cannot be loaded or smoke-tested
     ├── RequestError         an HTTP request answered with an error; the class says which
     │    │                   and ``HTTP_ERRORS`` maps it to status, OpenAI type and code
     │    ├── InvalidRequest (400) ── ContextTooLong (400)
     │    ├── RequestTooLarge (413), Unauthorized (401), Forbidden (403)
     │    ├── NotFound (404) ── ModelNotFound (404)
     │    ├── Conflict (409) ── ModelInUse (409)
     │    ├── QueueFull (429), RateLimited (429)
     │    ├── EngineError (500), StorageFull (507)
     │    ├── ModelNotReady (503), EngineDown (503), CloudUnavailable (503),
     │    │   BrokerUnavailable (503)
     │    ├── PoolUnavailable (503) ── NoPool (503)
     │    ├── UpstreamError (502)
     │    └── UpstreamTimeout (504)
     ├── FetchError           a transfer that cannot complete (timeout, disk, refused)
     │    └── NoSpaceError    not enough free disk for what must be written (with the numbers)
     └── BrokerError          a local broker that cannot be started or reached

Errors carry context (device id, digest, parameter) as attributes and in the message,
so a log line alone says what went wrong and where. Lower-library errors are mapped at the
boundary with ``raise ... from exc``.

Every HTTP service (the edge's local API, the pool, the gateway, the control plane) answers an
error through ``http_error``: the first class in the exception's MRO that ``HTTP_ERRORS`` lists
gives the status and the OpenAI ``type``/``code``; anything unlisted is a 500. Decisions are
made on the class, never on a code string (the edge falls back to the cloud on
``ModelNotReady``, ``ModelNotFound``, ``QueueFull``, ``ContextTooLong`` and any 5xx).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class AutoGLMError(Exception):
    """Root of every error this project raises on purpose."""

    def __init__(self, message: str, **context: Any) -> None:
        self.context = {k: v for k, v in context.items() if v is not None}
        suffix = ", ".join(f"{k}={v}" for k, v in self.context.items())
        super().__init__(f"{message} ({suffix})" if suffix else message)
        self.message = message


class ContractError(AutoGLMError):
    """A payload that breaks the wire contract; the receiver drops it and logs this."""


class ImpersonationError(ContractError):
    """A device message whose payload names another device than the topic it came on: the topic
    is what the broker's ACL vouches for, so the message is dropped and counted."""


class IntegrityError(AutoGLMError):
    """Bytes whose digest does not match what the manifest promised."""


class SignatureError(IntegrityError):
    """A manifest that is unsigned, signed by an untrusted key, or altered after signing."""


class DowngradeError(IntegrityError):
    """A signed manifest whose release number is lower than the highest this device installed of
    that model, named by a desired state that does not authorize a rollback."""


class ControlRejected(AutoGLMError):
    """A control message (desired state, command) that is not the control plane's, not for this
    device, past its expiry or older than one already obeyed. ``code`` says which, for the
    device's reported state."""

    def __init__(self, message: str, *, code: str, **context: Any) -> None:
        super().__init__(message, **context)
        self.code = code


class ConfigError(AutoGLMError):
    """Settings that fail validation; raised at start-up, never later."""


class PackagingError(AutoGLMError):
    """A model that could not be exported, validated, quantized or measured."""


class RegistryError(AutoGLMError):
    """A model or blob that is missing from, or clashes with, the registry."""


class ModelLoadError(AutoGLMError):
    """An ONNX model folder that cannot be loaded or fails its smoke test."""


class RequestError(AutoGLMError):
    """A request answered with an error. The class says which (``HTTP_ERRORS`` maps it);
    ``param`` names the request field at fault, ``retry_after_s`` is sent as Retry-After."""

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: int | None = None, **context: Any
    ) -> None:
        super().__init__(message, **context)
        self.param = param
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> int:
        return http_error(self).status

    @property
    def code(self) -> str:
        return http_error(self).code


class InvalidRequest(RequestError):
    """A request whose parameters cannot be served as given (the message names the field)."""


class ContextTooLong(InvalidRequest):
    """Prompt plus requested tokens do not fit the model's context."""


class RequestTooLarge(RequestError):
    """A request body over the service's limit."""


class Unauthorized(RequestError):
    """No API key, or one nobody issued (or revoked, or expired)."""


class Forbidden(RequestError):
    """A valid key whose scope does not allow this."""


class NotFound(RequestError):
    """No such device, rollout, key or tenant."""


class ModelNotFound(NotFound):
    """A model this service does not serve."""


class Conflict(RequestError):
    """The request clashes with the current state."""


class ModelInUse(Conflict):
    """A model a running rollout still needs."""


class QueueFull(RequestError):
    """Every generation slot and queue place is taken; retry after ``retry_after_s``."""


class RateLimited(RequestError):
    """The tenant is over its request rate."""


class EngineError(RequestError):
    """The model failed while generating."""


class StorageFull(RequestError):
    """The disk holding what the request must store is full: nothing was stored (the message
    says where and what the storage said); freeing space there lets it through."""


class ModelNotReady(RequestError):
    """No model is active here yet."""


class EngineDown(RequestError):
    """The pool's engine thread is not running."""


class CloudUnavailable(RequestError):
    """The cloud cannot take this request now (not configured, unreachable, failing, breaker open)."""

    def __init__(self, message: str, *, retry_after_s: int | None = 5, **context: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **context)


class BrokerUnavailable(RequestError):
    """The control plane cannot reach its MQTT broker: what the request would send to devices
    cannot go out now (what it recorded stays recorded; the message says which)."""

    def __init__(self, message: str, *, retry_after_s: int | None = 10, **context: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **context)


class PoolUnavailable(RequestError):
    """No pool replica could serve the request."""


class NoPool(PoolUnavailable):
    """The gateway has no pool replicas configured."""


class UpstreamError(RequestError):
    """A pool replica answered with a server error of its own or a body that is not an answer;
    what it said is logged, not passed to the client (it may name the replica's internals)."""


class UpstreamTimeout(RequestError):
    """A pool replica took the request and did not answer in time (busy, not down)."""


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str  # OpenAI's error type
    code: str


_SERVER = "server_error"
_INVALID = "invalid_request_error"
# The one table: exception class → HTTP answer. Looked up along the MRO (most specific first).
HTTP_ERRORS: dict[type[Exception], HttpError] = {
    ContextTooLong: HttpError(400, _INVALID, "context_length_exceeded"),
    InvalidRequest: HttpError(400, _INVALID, "invalid_request"),
    ContractError: HttpError(400, _INVALID, "invalid_request"),
    Unauthorized: HttpError(401, "authentication_error", "invalid_api_key"),
    Forbidden: HttpError(403, "permission_error", "insufficient_scope"),
    ModelNotFound: HttpError(404, "not_found_error", "model_not_found"),
    NotFound: HttpError(404, "not_found_error", "not_found"),
    RegistryError: HttpError(404, "not_found_error", "not_found"),
    ModelInUse: HttpError(409, _INVALID, "model_in_use"),
    Conflict: HttpError(409, _INVALID, "conflict"),
    RequestTooLarge: HttpError(413, _INVALID, "request_too_large"),
    QueueFull: HttpError(429, "rate_limit_error", "queue_full"),
    RateLimited: HttpError(429, "rate_limit_error", "rate_limited"),
    EngineError: HttpError(500, _SERVER, "engine_error"),
    StorageFull: HttpError(507, _SERVER, "storage_full"),
    ModelNotReady: HttpError(503, _SERVER, "model_not_ready"),
    EngineDown: HttpError(503, _SERVER, "engine_down"),
    CloudUnavailable: HttpError(503, _SERVER, "cloud_unavailable"),
    BrokerUnavailable: HttpError(503, _SERVER, "broker_unavailable"),
    NoPool: HttpError(503, _SERVER, "no_pool"),
    PoolUnavailable: HttpError(503, _SERVER, "pool_unavailable"),
    UpstreamError: HttpError(502, _SERVER, "upstream_error"),
    UpstreamTimeout: HttpError(504, _SERVER, "pool_timeout"),
    RequestError: HttpError(400, _INVALID, "invalid_request"),
}
_INTERNAL = HttpError(500, _SERVER, "internal_error")


def http_error(exc: BaseException) -> HttpError:
    """The HTTP answer for ``exc``: its nearest class in ``HTTP_ERRORS``, else a 500."""
    for cls in type(exc).__mro__:
        found = HTTP_ERRORS.get(cls)
        if found is not None:
            return found
    return _INTERNAL


class FetchError(AutoGLMError):
    """A blob transfer that cannot complete."""


class NoSpaceError(FetchError):
    """The data folder lacks the space an update needs; the message carries both numbers."""


class BrokerError(AutoGLMError):
    """A broker that cannot be started or reached."""
