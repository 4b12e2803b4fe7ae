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
     ├── InferenceError       a request the runtime cannot serve (bad parameters, no model)
     ├── FetchError           a transfer that cannot complete (timeout, disk, refused)
     │    └── NoSpaceError    not enough free disk for what must be written (with the numbers)
     └── BrokerError          a local broker that cannot be started or reached

Errors carry context (device id, digest, parameter) as attributes and in the message,
so a log line alone says what went wrong and where. Lower-library errors are mapped at the
boundary with ``raise ... from exc``.
"""

from __future__ import annotations

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


class InferenceError(AutoGLMError):
    """A request the local runtime cannot serve."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        retry_after_s: int | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.param = param
        self.status = status
        self.code = code
        # Sent as Retry-After on 429/503 answers.
        self.retry_after_s = retry_after_s


class FetchError(AutoGLMError):
    """A blob transfer that cannot complete."""


class NoSpaceError(FetchError):
    """The data folder lacks the space an update needs; the message carries both numbers."""


class BrokerError(AutoGLMError):
    """A broker that cannot be started or reached."""
