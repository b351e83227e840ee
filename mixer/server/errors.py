"""MixerError: an error with the gRPC status it maps to, its message made safe to send back."""

from __future__ import annotations

import grpc

MAX_MESSAGE = 1024
"""Characters of a status message (a limit on what the server echoes back)."""


class MixerError(Exception):
    """An error with the gRPC status it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        # A status message must be valid UTF-8 (a lone surrogate from bad input would stall the call),
        # and short: it travels in trailing metadata, whose size is limited (8 KiB by default), so
        # a long name echoed back would turn the answer into a transport error.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(message) > MAX_MESSAGE:
            message = f"{message[: MAX_MESSAGE - 40]}... ({len(message) - MAX_MESSAGE + 40} characters cut)"
        self.message = message
        super().__init__(self.message)
