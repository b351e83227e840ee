"""The training process is SIGKILLed and resumed from its checkpoint: its session picks up after the
last acknowledged report, re-sent steps are dropped as duplicates, and every step is logged once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import pretrain_args

from mixer.client import MixerClient
from mixer.store import Store


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(write_spec, server, tmp_path: Path) -> None:
    spec = write_spec("killed", "odm", cadence={"update_every": 3, "min_weight": 0.02})
    ckpt = tmp_path / "ckpt"
    args = pretrain_args(spec, "--mixer", server.address, "--save", str(ckpt), "--save-interval", "10", steps=60)
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115 (the killed process writes to it)
    first = subprocess.Popen([sys.executable, "-m", "mixer.megatron.pretrain", *args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (ckpt / "step_00000030").exists() and time.monotonic() < deadline:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    assert (ckpt / "step_00000030").exists(), "the first run never reached its step-30 checkpoint"
    time.sleep(0.5)  # let it report a few steps past the checkpoint
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    with MixerClient(server.address) as c:
        reported_before = c.get_job("killed").report_count
    assert reported_before >= 25

    second = subprocess.run(
        [sys.executable, "-m", "mixer.megatron.pretrain", *pretrain_args(spec, "--mixer", server.address, "--load", str(ckpt), steps=60), "--json"],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    store = Store(server.db, migrate=False)
    rec = store.get_job("killed")
    train_steps = [s.step for s in store.signals(rec.id) if s.source == "rank0"]
    store.close()
    # Each step is in the log exactly once: the resumed run re-sent the steps after the
    # checkpoint that the killed run had already reported, and those were dropped.
    assert sorted(train_steps) == list(range(60))
