"""Bearer tokens with roles, per job: reader (get, watch), writer (sessions, reports), admin.

A token reads `mx_<id>_<secret>`; the store keeps only SHA-256 of the secret, compared in
constant time. A role includes the ones below it (admin > writer > reader). A token is bound
to one job, or to every job ('*'). With auth off, every call is allowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import grpc

from mixer.server.runtime import MixerError
from mixer.store import Store

ROLES = ("reader", "writer", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}
ALL_JOBS = "*"
CACHE_SECONDS = 5.0
"""How long a verified token is trusted without reading its row again: a revoked token's new
calls are refused, and its open sessions end, within this period."""


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str
    job: str
    role: str

    def may(self, job: str | None, role: str) -> bool:
        return RANK[self.role] >= RANK[role] and (self.job == ALL_JOBS or job is None or self.job == job)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(store: Store, job: str, role: str) -> str:
    """Issue a token; the returned string is the only copy of its secret."""
    if role not in ROLES:
        raise ValueError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    if job != ALL_JOBS and store.get_job(job) is None:
        raise ValueError(f"job {job!r} not found (use --job '*' for a token valid for every job)")
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
    store.add_token(token_id, job, role, hash_secret(secret))
    return f"mx_{token_id}_{secret}"


class Authenticator:
    """Checks bearer tokens against the store, with a short cache of verified tokens."""

    def __init__(self, store: Store, enabled: bool):
        self.store = store
        self.enabled = enabled
        self._cache: dict[str, tuple[float, str, Principal]] = {}
        """token id -> (when its row was last read and found valid, secret digest, principal)."""

    @staticmethod
    def _parse(header: str | None) -> tuple[str, str]:
        """(token id, SHA-256 of the secret) of an Authorization header."""
        if not header:
            raise MixerError(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (metadata 'authorization: Bearer mx_...')")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.startswith("mx_") or token.count("_") < 2:
            raise MixerError(grpc.StatusCode.UNAUTHENTICATED, "malformed token; expected 'Bearer mx_<id>_<secret>'")
        _, token_id, secret = token.split("_", 2)
        return token_id, hash_secret(secret)

    def _cached(self, token_id: str, digest: str, max_age: float = CACHE_SECONDS) -> Principal | None:
        hit = self._cache.get(token_id)
        if hit and time.monotonic() - hit[0] < max_age and hmac.compare_digest(hit[1], digest):
            return hit[2]
        return None

    def principal(self, header: str | None) -> Principal:
        token_id, digest = self._parse(header)
        return self._cached(token_id, digest) or self._verify(token_id, digest, self.store.get_token(token_id))

    async def principal_async(self, header: str | None, max_age: float = CACHE_SECONDS) -> Principal:
        """principal() for the event loop: a cache miss reads the token row on a worker thread.

        max_age: trust a verdict at most this old (an open session re-checks with less)."""
        token_id, digest = self._parse(header)
        hit = self._cached(token_id, digest, max_age)
        if hit is not None:
            return hit
        return self._verify(token_id, digest, await asyncio.to_thread(self.store.get_token, token_id))

    def _verify(self, token_id: str, digest: str, row) -> Principal:
        now = time.monotonic()
        # Compare even when the id is unknown, so timing does not tell ids apart.
        expected = row[2] if row else hash_secret(secrets.token_hex(8))
        if not hmac.compare_digest(expected, digest) or row is None or row[3]:
            if row is not None and row[3]:
                self._cache.pop(token_id, None)  # revoked: no call trusts the old verdict any longer
            raise MixerError(grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token")
        p = Principal(token_id, row[0], row[1])
        self._cache[token_id] = (now, digest, p)
        return p

    @staticmethod
    def _allow(p: Principal, job: str | None, role: str) -> Principal:
        if not p.may(job, role):
            what = f"job {job!r}" if job else "this call"
            raise MixerError(grpc.StatusCode.PERMISSION_DENIED, f"token {p.token_id} ({p.role} on {p.job!r}) may not act as {role} on {what}")
        return p

    def check(self, header: str | None, job: str | None, role: str) -> Principal | None:
        """For the HTTP side's threads."""
        if not self.enabled:
            return None
        return self._allow(self.principal(header), job, role)

    async def check_grpc(self, context: grpc.aio.ServicerContext, job: str | None, role: str, max_age: float = CACHE_SECONDS) -> Principal | None:
        if not self.enabled:
            return None
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        return self._allow(await self.principal_async(header, max_age), job, role)
