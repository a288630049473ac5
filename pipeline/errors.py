"""One base error and a few subclasses; every refusal carries a short coded reason.

A reason code is a short lower-case slug, optionally followed by ``:detail``
(``slice-too-thick:5.0mm``, ``missing-slices:gap=3.0mm``).  Codes reach the worklist
verbatim as "not analysed: <code>", so they are part of the user interface: keep them
stable and register every new one in ``pipeline/reasons.py`` (its table is
docs/reasons.md; ``tests/test_reasons.py`` finds the codes raised and checks both).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class CtscreenError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(CtscreenError):
    """A configuration file is missing, malformed or holds an unknown key."""


class NotAnalysable(CtscreenError):
    """Input that cannot be analysed; carries one coded reason (and a human sentence).

    Raised by the pure stages (selection, volume, lungs, lesions) and turned into a
    "not analysed" worklist row by ``run.py``.  Never means "negative".
    """

    def __init__(self, code: str, message: str = "") -> None:
        self.code = code
        self.message = message or code
        super().__init__(f"{code}: {self.message}" if message else code)
        _check_registered(code)

    def __reduce__(self) -> tuple[type[NotAnalysable], tuple[str, str]]:
        # Keeps code and message apart when a refusal crosses a process boundary.
        return (type(self), (self.code, self.message))


def _check_registered(code: str) -> None:
    """Log (never raise: a refusal must stay a refusal) a code missing from the registry."""
    try:
        from .reasons import is_registered

        if not is_registered(code):
            log.warning("reason code %r is not registered in pipeline/reasons.py", code)
    except Exception:  # noqa: BLE001 - a check of the docs must never break a refusal
        pass


class ArchiveError(CtscreenError):
    """The archive could not be read or written (I/O, network, refused store)."""


class ModelError(CtscreenError):
    """A model file is missing, its hash does not match its model.yaml, or it will not load."""


class ArchiveUnavailable(ArchiveError):
    """The archive could not be reached or stopped answering (refused connection, timeout,
    TLS failure, aborted association): worth trying again later."""


class TlsRefused(ArchiveError):
    """A TLS peer's certificate did not verify, or the peer refused ours: it will not heal
    by trying again; someone must fix the certificates (the nightly batch does not retry
    such a site)."""


class StoreRefused(ArchiveError):
    """The archive answered a store with a failure status: trying the same object again
    unchanged will fail the same way, so it is recorded, not retried blindly."""

    def __init__(self, status: int | str, message: str) -> None:
        self.status = status
        super().__init__(message)
