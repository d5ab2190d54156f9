"""fit (through its pre-training caller `pretrain`): exact resume, SIGTERM, non-finite loss, 8-device sharding, metrics files, config errors.

All runs use the tiny preset (vocab widened to the shipped tokenizer's 4096) on the embedded
corpus, 8 rows of 32 tokens, a few steps.
"""
import json
import os
import signal
import threading

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxllm.data import sources
from jaxllm.model import presets
from jaxllm.train import checkpoint, metrics, pretrain
from jaxllm.train.config import TrainConfig
from jaxllm.train.optim import OptimizerConfig

STEPS = 6
real_lm_batches = sources.lm_batches  # tests below wrap it
ONE_DEVICE = jax.devices()[:1]


def tiny_config(**overrides) -> TrainConfig:
    fields = dict(model=presets.get("tiny", vocab_size=4096), steps=STEPS, batch_size=8, seq_len=32,
                  checkpoint_every=3, log_every=1, peak_flops=1e11, sample_tokens=0,
                  optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2))
    return TrainConfig(**{**fields, **overrides})


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bit_identical(a, b):
    for x, y in zip(host(a), host(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """STEPS steps in one call, then a sample."""
    workdir = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(sample_tokens=8, sample_prompt="The")
    return pretrain.pretrain(cfg, workdir, devices=ONE_DEVICE), workdir


def batches():
    """A fresh data iterator of the pipeline `fit` builds for `tiny_config()`."""
    cfg = tiny_config()
    return pretrain.lm_stream(cfg, pretrain.load_tokenizer(cfg.data))


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_straight_run_logs_and_checkpoints(straight):
    result, workdir = straight
    assert sorted(result.losses) == list(range(1, STEPS + 1)) and not result.preempted
    assert int(result.state.step) == STEPS
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == [result.losses[s] for s in range(1, STEPS + 1)]
    assert records[0]["tokens_per_s"] is None  # the compiling step is not timed
    for r in records[1:]:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0
    assert records[1]["learning_rate"] == pytest.approx(3e-3)  # end of the 2-step warmup
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
    sample = records[-1]["sample"]
    assert sample == result.history[-1]["sample"] and sample.startswith("The") and len(sample) > len("The")
    assert all("sample" not in r for r in records[:-1])


def test_resume_is_bit_identical(straight, tmp_path):
    result, straight_dir = straight
    first = pretrain.pretrain(tiny_config(), tmp_path, devices=ONE_DEVICE, until_step=STEPS // 2)
    assert int(first.state.step) == STEPS // 2
    second = pretrain.pretrain(tiny_config(), tmp_path, devices=ONE_DEVICE)
    assert sorted(second.losses) == list(range(STEPS // 2 + 1, STEPS + 1)), "resumed at the checkpoint"
    assert {**first.losses, **second.losses} == result.losses
    assert_bit_identical(second.state, result.state)
    assert [r["loss"] for r in read_metrics(tmp_path)] == [r["loss"] for r in read_metrics(straight_dir)]


class SignalAt:
    """A batch iterator that, when batch `at` is drawn, sends SIGTERM to this process from another
    thread (as a preemption notice would arrive) and waits until it has been sent."""

    def __init__(self, inner, at):
        self.inner, self.at, self.drawn = inner, at, 0

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.at:
            sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
            sender.start()
            sender.join()
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_sigterm_saves_then_resume_finishes_identically(straight, tmp_path, monkeypatch):
    result, _ = straight
    monkeypatch.setattr(sources, "lm_batches", lambda *a, **k: SignalAt(real_lm_batches(*a, **k), at=2))
    handler_before = signal.getsignal(signal.SIGTERM)  # another library (e.g. ray) may own it
    stopped = pretrain.pretrain(tiny_config(), tmp_path, devices=ONE_DEVICE)
    assert stopped.preempted and int(stopped.state.step) == 2
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps() == [2]
    assert signal.getsignal(signal.SIGTERM) is handler_before, "the previous handler is restored"

    monkeypatch.setattr(sources, "lm_batches", real_lm_batches)
    resumed = pretrain.pretrain(tiny_config(), tmp_path, devices=ONE_DEVICE)
    assert not resumed.preempted and sorted(resumed.losses) == [3, 4, 5, 6]
    assert_bit_identical(resumed.state, result.state)


def test_sigterm_during_the_final_checkpoint_write_does_not_kill_it(straight, tmp_path, monkeypatch):
    """Regression (crash-resume campaign): the last write was awaited after the SIGTERM handler was
    restored, so a preemption notice then killed the process with the final checkpoint half-written."""
    result, _ = straight
    handler_before = signal.getsignal(signal.SIGTERM)
    real_wait, handlers = checkpoint.Checkpointer.wait, []

    def wait_with_a_sigterm(self):
        handlers.append(signal.getsignal(signal.SIGTERM))
        if handlers[-1] is not handler_before:  # the old code would let this signal kill the test run
            os.kill(os.getpid(), signal.SIGTERM)
        real_wait(self)

    monkeypatch.setattr(checkpoint.Checkpointer, "wait", wait_with_a_sigterm)
    finished = pretrain.pretrain(tiny_config(), tmp_path, devices=ONE_DEVICE)
    assert handlers and handlers[-1] is not handler_before, "the final write is awaited under the loop's handler"
    assert not finished.preempted and checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps() == [3, 6]
    assert_bit_identical(finished.state, result.state)


class PoisonAt(SignalAt):
    """Batch `at` has a NaN loss mask, so that step's loss is NaN."""

    def __next__(self):
        self.drawn += 1
        batch = next(self.inner)
        if self.drawn == self.at:
            batch = {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}
        return batch


def test_nan_loss_stops_naming_the_step_and_keeps_last_good(straight, tmp_path, monkeypatch):
    result, straight_dir = straight
    monkeypatch.setattr(sources, "lm_batches", lambda *a, **k: PoisonAt(real_lm_batches(*a, **k), at=5))
    with pytest.raises(FloatingPointError, match=r"step 5\b.*last good checkpoint \(step 3\)"):
        pretrain.pretrain(tiny_config(log_every=4), tmp_path, devices=ONE_DEVICE)  # step 5 is read after 6 runs
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [3]
    abstract = checkpoint.abstract_like(result.state)
    kept, reference = batches(), batches()
    assert_bit_identical(ckpt.restore_latest(abstract, kept),
                         checkpoint.Checkpointer(straight_dir / "checkpoints").restore(3, abstract, reference))
    assert_bit_identical(next(kept), next(reference))


def test_eight_devices_match_one_device(straight, tmp_path):
    """Same loss curve on a data:2 × fsdp:4 mesh of 8 CPU devices as on 1 device, to 1e-5
    relative (only the order of floating-point reductions differs)."""
    result, _ = straight
    sharded = pretrain.pretrain(tiny_config(mesh="data:2,fsdp:4", checkpoint_every=100), tmp_path)
    up = PartitionSpec("fsdp", "tensor")
    assert sharded.state.params["layers_0"]["mlp"]["up"].sharding.spec == up
    moments = [x for path, x in jax.tree_util.tree_flatten_with_path(sharded.state.opt_state)[0]
               if jax.tree_util.keystr(path).endswith("['layers_0']['mlp']['up']")]
    assert len(moments) == 2 and all(m.sharding.spec == up for m in moments), "Adam moments sharded like params"
    got = [sharded.losses[s] for s in range(1, STEPS + 1)]
    want = [result.losses[s] for s in range(1, STEPS + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want[-1] < want[0] - 0.05, "the curve being compared must move"


def test_bad_configs_name_the_values(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size 12 .*data-parallel size 8"):
        pretrain.pretrain(tiny_config(batch_size=12, mesh="fsdp:8"), tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer vocab_size 4096 .* model's vocab_size 512"):
        pretrain.pretrain(tiny_config(model=presets.get("tiny")), tmp_path, devices=ONE_DEVICE)
    with pytest.raises(ValueError, match=r"seq_len 1024 .* max_len 512"):
        tiny_config(seq_len=1024)
    with pytest.raises(ValueError, match=r"until_step must be in \[1, steps=6\], got 7"):
        pretrain.pretrain(tiny_config(), tmp_path, devices=ONE_DEVICE, until_step=7)


def test_metrics_of_a_resumed_run_continue_after_its_checkpoint(tmp_path):
    """Records written after the checkpoint a run resumes from, and a line torn by a crash, go."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    writer = metrics.MetricsWriter(tmp_path, start_step=1)
    writer.write(2, {"loss": 1.5, "tokens_per_s": None})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5, "tokens_per_s": None}]
