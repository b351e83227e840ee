"""MixerError: an error with the gRPC status it maps to, its message made safe to send back.

A server that does not own a job (high availability, several workers) answers UNAVAILABLE with
the owner's address in the trailing metadata `mixer-owner` (`OWNER_METADATA`), besides the
message a person reads; `MixerClient` and `Reporter` connect there. It also sends
`grpc-retry-pushback-ms: -1`, which tells a client's gRPC retry policy not to retry the call on
this server (gRFC A6): the retry belongs at the owner.
"""

from __future__ import annotations

import grpc

MAX_MESSAGE = 1024
"""Characters of a status message (a limit on what the server echoes back)."""
OWNER_METADATA = "mixer-owner"
"""Trailing metadata key of a redirect: the job owner's address, host:port."""
NO_RETRY_METADATA = ("grpc-retry-pushback-ms", "-1")


class MixerError(Exception):
    """An error with the gRPC status it maps to (and for a redirect, the job owner's address)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, owner: str | None = None):
        self.code = code
        self.owner = owner
        # A status message must be valid UTF-8 (a lone surrogate from bad input would stall the call),
        # and short: it travels in trailing metadata, whose size is limited (8 KiB by default), so
        # a long name echoed back would turn the answer into a transport error.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(message) > MAX_MESSAGE:
            message = f"{message[: MAX_MESSAGE - 40]}... ({len(message) - MAX_MESSAGE + 40} characters cut)"
        self.message = message
        super().__init__(self.message)

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """What travels with the status besides the message: a redirect's owner address."""
        if self.owner is None:
            return ()
        return ((OWNER_METADATA, self.owner), NO_RETRY_METADATA)
