"""The training loop's shared parts: steps dispatched without waiting for them and accounted for one
step late, in order, with wall times that add up to the time the device worked; each step's batch
assembled ahead on the mesh, with an iterator state that resumes after the last batch taken."""

import io
import json
import math
import threading
import time

import grain
import jax
import numpy as np
import pytest
from tqdm import tqdm

from launch import loop as loop_lib
from nanochat_jax import sharding


class FakeDevice:
    """A clock and a device that runs each dispatched step for `step_s` seconds, after the step
    before it. A dispatch takes `dispatch_s`, then blocks until at most `queue_s` of work is queued
    (the launch queue's room). Reading a step's loss moves the clock to the step's end (if it is not
    past it); a thread that waits for a step reads the clock as the step ends."""

    def __init__(self, step_s=10.0, dispatch_s=1.0, queue_s=math.inf):
        self.now, self.step_s, self.dispatch_s, self.queue_s = 0.0, step_s, dispatch_s, queue_s
        self.device_free_at = 0.0
        self.events = []
        self.waiters_now = {}  # thread id -> the end of the step that thread last waited for

    def clock(self):
        return self.waiters_now.get(threading.get_ident(), self.now)

    def step_fn(self, params, opt_state, batch):
        self.now += self.dispatch_s
        self.device_free_at = max(self.now, self.device_free_at) + self.step_s
        self.now = max(self.now, self.device_free_at - self.queue_s)
        self.events.append(("dispatch", batch))
        return params + 1, opt_state, Loss(self, batch, self.device_free_at)


class Loss:
    def __init__(self, device, step, ready_at):
        self.device, self.step, self.ready_at = device, step, ready_at

    def __float__(self):
        self.device.events.append(("read", self.step))
        self.device.now = max(self.device.now, self.ready_at)
        return float(self.step)

    def block_until_ready(self):
        self.device.waiters_now[threading.get_ident()] = self.ready_at
        return self


@pytest.fixture
def device(monkeypatch):
    device = FakeDevice()
    monkeypatch.setattr(loop_lib.time, "perf_counter", device.clock)
    return device


def test_each_loss_is_read_after_the_next_step_is_dispatched(device):
    done = []
    steps = loop_lib.OneStepLate(device.step_fn, lambda loss, dt, **metrics: done.append((loss, metrics)))
    params = 0
    for i in range(3):
        params, _ = steps(params, None, i, step=i)
    # The first step (it compiles) is waited for at once; from then on each is read one step late.
    assert device.events == [("dispatch", 0), ("read", 0), ("dispatch", 1), ("dispatch", 2), ("read", 1)]
    assert params == 3  # the returned state is the dispatched step's, not a waited-for one
    steps.settle()
    steps.settle()  # nothing in flight: a no-op
    assert device.events[-1] == ("read", 2) and len(device.events) == 6
    assert done == [(0.0, {"step": 0}), (1.0, {"step": 1}), (2.0, {"step": 2})]


@pytest.mark.parametrize("queue_steps", [math.inf, 0.5], ids=["dispatch-never-blocks", "dispatch-blocks"])
def test_step_times_add_up_to_the_device_time(device, queue_steps):
    # With "dispatch-blocks" a dispatch returns only once half a step is left queued, so the host
    # reads a loss well after its step ended: the times still run from each step's start on the
    # device to its end, the last step's included.
    device.queue_s = queue_steps * device.step_s
    times = []
    steps = loop_lib.OneStepLate(device.step_fn, lambda loss, dt: times.append(dt))
    for i in range(4):
        steps(0, None, i)
    steps.settle()
    # The first two from their dispatches (the device idles while the host dispatches the second),
    # then each from the end of the one it was queued behind.
    assert times == [device.dispatch_s + device.step_s] * 2 + [device.step_s] * 2
    device.now += 100.0  # the host away (an eval): the next step starts at its dispatch, not before
    steps(0, None, 4)
    steps.settle()
    assert times[-1] == device.dispatch_s + device.step_s


def test_accounting_keeps_compilation_out_of_the_training_time(device, tmp_path):
    loop = {"smooth_loss": 0.0, "training_time_s": 0.0}
    log = loop_lib.MetricsLog(str(tmp_path))
    bar = tqdm(total=3, file=io.StringIO())
    steps = loop_lib.OneStepLate(device.step_fn, loop_lib.step_accounting(
        start_step=5, loop=loop, flops_per_token=6, log=log, bar=bar))
    for step in (5, 6, 7):
        steps(0, None, step, step=step, tokens=100, lr_multiplier=1.0)
    steps.settle()
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 6, 7]
    assert [r["includes_compile"] for r in records] == [True, False, False]
    assert loop["training_time_s"] == records[1]["dt_s"] + records[2]["dt_s"]  # steps 6 and 7 only
    assert records[1]["dt_s"] == device.dispatch_s + device.step_s and records[2]["dt_s"] == device.step_s
    assert records[2]["tokens_per_s"] == 100 / device.step_s and records[2]["mfu_percent"] is None
    # The EMA is debiased from step 0: the losses 5, 6, 7 of steps 5, 6, 7.
    ema = 0.0
    for loss in (5.0, 6.0, 7.0):
        ema = loop_lib.EMA * ema + (1 - loop_lib.EMA) * loss
    assert records[-1]["loss_ema"] == pytest.approx(ema / (1 - loop_lib.EMA ** 8))
    assert bar.n == 3


class Counting(grain.IterDataset):
    """Rows (inputs, targets) = (n, -n) for n = 1, 2, ...: 2 rows x 3 tokens per micro-batch."""

    def __iter__(self):
        return CountingIterator()


class CountingIterator(grain.DatasetIterator):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __next__(self):
        self.n += 1
        return np.full((2, 3), self.n, np.int32), np.full((2, 3), -self.n, np.int32)

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def test_step_batches_are_global_and_resume_at_the_last_batch_taken():
    mesh = sharding.make_mesh(devices=jax.devices()[:2])
    micro_sharding = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    batches = loop_lib.step_batches(Counting(), 4, micro_sharding)
    inputs, targets = next(batches)
    assert inputs.shape == (4, 2, 3) and inputs.sharding == micro_sharding
    np.testing.assert_array_equal(np.asarray(inputs)[:, 0, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(np.asarray(targets), -np.asarray(inputs))
    time.sleep(0.2)  # the background thread has assembled the next step by now
    assert batches.get_state() == {"n": 4}  # taken, not prepared
    resumed = loop_lib.step_batches(Counting(), 4, micro_sharding)
    resumed.set_state(batches.get_state())
    np.testing.assert_array_equal(np.asarray(next(resumed)[0]), np.asarray(next(batches)[0]))
