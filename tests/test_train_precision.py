"""Training on a requested device and precision: a device audit, bf16/fp16 autocast against fp32, the loss
scaler's checkpointed state, the recorded matmul settings, activation checkpointing, and bad --device."""

import pytest
import torch

from harness.training.checkpoint import load_checkpoint
from harness.training.loop import Trainer, TrainOptions, train

from .conftest import randomize_


def _opts(tmp_path, **kw) -> TrainOptions:
    base = {
        "family": "pixel-base",
        "preset": "tiny",
        "text_encoder": "none",
        "num_videos": 8,
        "batch": 2,
        "steps": 3,
        "warmup_steps": 0,
        "checkpoint_every": 1,
        "out": str(tmp_path / "run"),
        "lr": 1e-3,
        "weight_decay": 0.01,
        "device": "cpu",
    }
    base.update(kw)
    return TrainOptions(**base)


def _randomized(trainer: Trainer) -> Trainer:
    """Random weights (the zero-initialised output layers would hide autocast's effect on the loss), with
    the EMA restarted from them."""
    from harness.training.masked_optim import MaskedEMA

    randomize_(trainer.net, seed=3)
    trainer.ema = MaskedEMA(trainer.net.named_parameters(), decay=trainer.opts.ema_decay)
    return trainer


@pytest.mark.parametrize(
    ("family", "text_encoder"), [("pixel-base", "minilm"), ("pixel-ssr", "none")], ids=["base+text", "ssr"]
)
def test_a_training_step_creates_no_tensor_off_the_requested_device(tmp_path, family, text_encoder):
    """Device audit: with the default device set to ``meta``, any tensor the step (batch drawing, text
    encoding, noising, forward, backward, clip, masked update, EMA) creates without naming its device
    lands on ``meta``, and mixing it with the run's real CPU tensors raises. The step must still run."""
    trainer = Trainer(_opts(tmp_path, family=family, text_encoder=text_encoder, cond_drop=0.5))
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        stats = trainer.train_step()
    finally:
        torch.set_default_device(previous)
    assert torch.isfinite(torch.tensor(stats["Loss/train"]))
    after = trainer.net.state_dict()
    assert all(v.device.type == "cpu" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it really trained


def test_bf16_autocast_trains_and_its_first_loss_is_close_to_fp32(tmp_path):
    """Same weights, same batch: the bf16-autocast forward's loss is within 1e-3 (relative) of fp32's; the
    next step runs with a finite loss, moves the weights and keeps them fp32."""
    fp32 = _randomized(Trainer(_opts(tmp_path / "a")))
    bf16 = _randomized(Trainer(_opts(tmp_path / "b", precision="bf16-autocast")))
    assert all(torch.equal(a, b) for a, b in zip(fp32.net.parameters(), bf16.net.parameters(), strict=True))
    first32, first16 = fp32.train_step(), bf16.train_step()
    assert first16["Loss/train"] != first32["Loss/train"]  # autocast really ran in bf16
    # Measured: 1.2e-5 relative (the per-element bf16 errors, ~4e-3, average out in the mean).
    assert first16["Loss/train"] == pytest.approx(first32["Loss/train"], rel=1e-3)
    w0 = {k: v.clone() for k, v in bf16.net.state_dict().items()}
    stats = bf16.train_step()
    assert torch.isfinite(torch.tensor(stats["Loss/train"]))
    assert all(p.dtype == torch.float32 for p in bf16.net.parameters())  # weights stay fp32
    assert any(not torch.equal(w0[k], v) for k, v in bf16.net.state_dict().items())


# fp16 autocast on the CPU is slow (~15 s a step on 2 shared cores).
@pytest.mark.parametrize(
    "precision", ["bf16-autocast", pytest.param("fp16-autocast", marks=pytest.mark.slow)]
)
def test_autocast_resume_is_bit_exact(tmp_path, precision):
    """A run killed after 1 step and resumed equals a straight 2-step run, bit for bit; fp16's loss
    scaler (scale and growth tracker) is part of the checkpoint."""
    straight = train(_opts(tmp_path / "a", precision=precision, steps=2), progress=False)
    train(_opts(tmp_path / "b", precision=precision, steps=1), progress=False)
    resumed = train(_opts(tmp_path / "b", precision=precision, steps=2, resume=True), progress=False)
    assert resumed.step == 2
    for (k, a), (_, b) in zip(
        straight.net.state_dict().items(), resumed.net.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    ea, eb = straight.ema.state_dict(), resumed.ema.state_dict()
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    saved = load_checkpoint(tmp_path / "b" / "run" / "checkpoint")["training"]["precision"]
    assert saved["mode"] == precision
    if precision == "fp16-autocast":
        assert saved["grad_scaler"]["scale"] == straight.precision.scaler.get_scale() > 1
        assert saved["grad_scaler"] == straight.precision.state_dict()
    else:
        assert saved["grad_scaler"] is None


@pytest.mark.slow
def test_fp16_overflow_skips_the_step_and_backs_off_the_scale(tmp_path):
    """An inf gradient under fp16-autocast leaves weights, moments and EMA untouched and halves the scale."""
    trainer = Trainer(_opts(tmp_path, precision="fp16-autocast"))
    # A scale finite in fp32 under which the fp16 backward overflows.
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    weights = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    ema = trainer.ema.state_dict()
    trainer.train_step()
    assert trainer.precision.scaler.get_scale() == 2.0**99  # backed off
    assert all(torch.equal(weights[k], v) for k, v in trainer.net.state_dict().items())
    assert all(torch.equal(ema[k], v) for k, v in trainer.ema.state_dict().items())
    trainer.precision.scaler.update(2.0**10)
    trainer.train_step()  # a workable scale trains again
    assert any(not torch.equal(weights[k], v) for k, v in trainer.net.state_dict().items())


def test_checkpoint_records_device_precision_and_matmul_settings(tmp_path):
    trainer = train(_opts(tmp_path, steps=1), progress=False)
    meta = load_checkpoint(tmp_path / "run" / "checkpoint")["training"]
    assert meta["device"]["type"] == "cpu" and meta["options"]["device"] == "cpu"
    assert meta["precision"]["mode"] == "fp32" and meta["precision"]["matmul"]["tf32"] is False
    assert meta["precision"]["matmul"] == trainer.matmul
    assert meta["precision"]["matmul"]["float32_matmul_precision"] == "highest"
    assert torch.backends.cudnn.allow_tf32 is False  # set explicitly (torch's own default is True)


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    """--checkpointing recomputes activations in backward: the same loss and update, less memory."""
    plain = _randomized(Trainer(_opts(tmp_path / "a")))
    ckpt = _randomized(Trainer(_opts(tmp_path / "b", checkpointing=True)))
    assert ckpt.net.activation_checkpointing
    a, b = plain.train_step(), ckpt.train_step()
    assert a["Loss/train"] == b["Loss/train"]
    for (k, p), (_, q) in zip(plain.net.named_parameters(), ckpt.net.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=k)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_missing_device_is_one_line_of_bad_input(tmp_path):
    from harness.train import main

    with pytest.raises(
        ValueError, match=r"--device cuda: this machine has no CUDA device .*pass --device cpu"
    ):
        main(["--device", "cuda", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="is not a torch device"):
        main(["--device", "tpu9", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: an unknown precision
        main(["--precision", "int8", "--steps", "1", "--out", str(tmp_path)])
