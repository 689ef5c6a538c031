"""Errors shared across layers."""

from __future__ import annotations

from typing import Any


class FieldError(ValueError):
    """A bad value of one request field; `param` names it (an HTTP 400 body names it too).

    Pickles with its field (`__reduce__`), so it crosses Ray's process boundary intact: a replica's bad-request
    error reaches the ingress as itself, not as an undeserialisable exception answered with a 500.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.param, str(self))
