"""`mixer bench load --client aio`: many sessions per client process, as asyncio tasks.

A load generator should cost the machine it shares with the server as little as it can (the
clients of a real deployment run on other machines). The Reporter client (`--client reporter`)
is what a training job runs: a thread, a synchronous gRPC stream and a buffer that survives
reconnects, in one process per session; on a 2-core machine 64 of them take more CPU than the
server they measure. Here each process runs its share of the sessions as tasks on one event
loop, over grpc.aio, with reports serialized as they are sent and the Session protocol spoken
directly: hello, then a window of reports per message (the Reporter sends a full window the
same way: whatever is queued, as one batch), acknowledgements read as they come. A session sent
to its job's owner (servers > 1) reconnects there before it reports. It does not resend: an
error ends the session and is reported, which a benchmark wants.

Each session's result is built as a Reporter session's is (load_session.session_result).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import grpc

from mixer.bench.load_session import session_result, session_values
from mixer.client import MAX_HOPS, owner_of
from mixer.reporter import SESSION_METHOD, session_request
from mixer.v1 import mixer_pb2 as pb


class _Session:
    """One session: a stream, its window of unacknowledged reports and its latencies."""

    def __init__(self, address: str, job: str, window: int, rate: float):
        self.address, self.job, self.window, self.rate = address, job, window, rate
        self.loss, self.tokens = session_values(job)
        self.sent_at: dict[int, float] = {}
        self.latencies: list[float] = []
        self.step = self.acked = self.refused = 0
        self.error: str | None = None
        self.room = asyncio.Event()
        self.channel: grpc.aio.Channel | None = None
        self.call = None

    async def connect(self) -> None:
        """Open the session (at the job's owner, following redirects) and read its welcome."""
        for _ in range(MAX_HOPS + 1):
            self.channel = grpc.aio.insecure_channel(self.address)
            self.call = self.channel.stream_stream(
                SESSION_METHOD, request_serializer=None, response_deserializer=pb.SessionResponse.FromString
            )()
            await self.call.write(pb.SessionRequest(hello=pb.Hello(job=self.job, source="load")).SerializeToString())
            try:
                first = await self.call.read()
            except grpc.aio.AioRpcError as e:
                owner = owner_of(e)
                await self.channel.close()
                if owner is None:
                    raise
                self.address = owner
                continue
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
                raise RuntimeError(f"session for {self.job}: no welcome ({first})")
            return
        raise RuntimeError(f"session for {self.job}: more than {MAX_HOPS} redirects")

    def _report(self, due: float) -> bytes:
        # Paced, latency counts from when the report was due (a session held back by a full
        # window still counts the wait: no coordinated omission).
        self.sent_at[self.step] = min(due, time.perf_counter())
        data = pb.Signals(
            step=self.step, source="load", domain_loss_sum=self.loss, domain_token_count=self.tokens
        ).SerializeToString()
        self.step += 1
        return data

    async def send(self, end: float) -> None:
        """Full rate: the next window once the last is acknowledged, as one message. Paced: one
        report when it is due and the window allows."""
        due = time.perf_counter()
        while self.error is None and time.time() < end:
            if self.rate > 0:
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                if len(self.sent_at) >= self.window:
                    await self._room()
                    continue
                datas = [self._report(due)]
                due += 1.0 / self.rate
            else:
                if self.sent_at:
                    await self._room()
                    continue
                now = time.perf_counter()
                datas = [self._report(now) for _ in range(self.window)]
            await self.call.write(session_request(datas))

    async def _room(self) -> None:
        self.room.clear()
        try:
            await asyncio.wait_for(self.room.wait(), 0.1)
        except TimeoutError:
            pass

    async def receive(self) -> None:
        """Acknowledgements (and refusals) until the stream ends."""
        while True:
            resp = await self.call.read()
            if resp is grpc.aio.EOF:
                return
            kind = resp.WhichOneof("kind")
            if kind in ("ack", "acks"):
                acks = [resp.ack] if kind == "ack" else resp.acks.acks
                now = time.perf_counter()
                for a in acks:
                    t = self.sent_at.pop(a.step, None)
                    if t is not None:
                        self.latencies.append(now - t)
                self.acked += len(acks)
                self.room.set()
            elif kind == "nack":
                self.refused += 1
                self.sent_at.pop(resp.nack.step, None)
                self.error = self.error or f"report step {resp.nack.step} refused: {resp.nack.message}"
                self.room.set()

    async def run(self, end: float) -> None:
        reader = asyncio.ensure_future(self.receive())
        try:
            await self.send(end)
            deadline = time.time() + 120
            while self.sent_at and not reader.done() and time.time() < deadline:
                await self._room()
            await self.call.done_writing()
            await asyncio.wait_for(reader, 30)
        except grpc.aio.AioRpcError as e:
            self.error = self.error or f"{e.code().name}: {e.details()}"
        except TimeoutError:
            self.error = self.error or "the stream did not end within 30 s of the last report"
        finally:
            reader.cancel()
            if self.sent_at and self.error is None:
                self.error = f"{len(self.sent_at)} reports unacknowledged at the end"
            await self.channel.close()

    def result(self) -> dict[str, Any]:
        return session_result(self.job, self.step, self.acked, self.refused, self.latencies, self.error)


def sessions_worker(
    address: str, jobs: list[str], duration: float, window: int, rate: float, nice: int, go, out
) -> None:
    """One client process: its sessions connect, report "ready" each, wait for `go`, stream for
    `duration` seconds, and put one result each into `out`."""
    os.nice(nice)  # a load generator: the server under test gets the CPU first when both want it

    async def main() -> None:
        sessions = [_Session(address, j, window, rate) for j in jobs]
        for s, r in zip(sessions, await asyncio.gather(*(s.connect() for s in sessions), return_exceptions=True)):
            if isinstance(r, BaseException):
                s.error = f"no session: {type(r).__name__}: {r}"
            out.put({"ready": s.job})
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 300)
        end = time.time() + duration
        await asyncio.gather(*(s.run(end) for s in sessions if s.error is None))
        for s in sessions:
            out.put(s.result())

    asyncio.run(main())
