"""The ingest path leaves no reference cycles: batches are freed by reference counting.

Cycles would be collected eventually, but under load the collector's full passes over a busy
heap stalled the event loop for tens of milliseconds (the ack p99 of `mixer bench load` doubled
when one closure held the future that held it).
"""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import Future

from mixer.server.runtime import Runtimes, Taken
from mixer.store import Store
from mixer.store.writer import GroupCommitWriter
from mixer.v1 import mixer_pb2 as pb


def test_ingested_batches_leave_no_cyclic_garbage(sqlite_url):
    async def run() -> list:
        store = Store(sqlite_url)
        writer = GroupCommitWriter(store)
        rts = Runtimes(store, writer)
        await rts.create_job('{"name": "g", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 2}}')
        rt = await rts.get("g")
        step = 0

        async def batches(n: int) -> None:
            nonlocal step
            done: list[asyncio.Future] = []
            for _ in range(n):
                msgs = [pb.Signals(step=step + i, source="w", domain_loss_sum=[1.0, 2.0], domain_token_count=[1.0, 1.0]) for i in range(3)]
                step += 3
                fut = asyncio.get_running_loop().create_future()

                def on_taken(taken: Taken, fut=fut) -> None:
                    assert not taken.refused
                    rts.when_settled(rt, taken, fut.set_result)

                rts.begin_ingest(rt, msgs, on_taken)
                done.append(fut)
            assert await asyncio.gather(*done) == [None] * n  # every batch durable, no error

        await batches(20)  # warm-up: lazily built state is not the hot path's
        await rts.ingest(rt, pb.Signals(step=step, source="w", domain_loss_sum=[1.0, 2.0], domain_token_count=[1.0, 1.0]))
        step += 1
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await batches(100)
            gc.collect()
            garbage = list(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        writer.close()
        store.close()
        return garbage

    garbage = asyncio.run(run())
    assert not [o for o in garbage if isinstance(o, (Taken, Future))], "a batch was freed only by the cyclic collector"
