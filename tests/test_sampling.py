"""Generation: the requested size from a supernet subnet, from an extracted subnet, and through the chain."""

import torch

from harness.pipeline import Chain, generate
from harness.training.loop import Trainer, TrainOptions
from harness.training.samples import write_training_samples


def test_generate_from_subnet_and_from_extracted_subnet_match(tiny_nets):
    base = tiny_nets["pixel-base"]
    cfg = base.space.sample(11)
    prompts_ctx = None  # unconditional: the null text embedding
    a = generate(Chain(base, None, prompts_ctx, base_subnet=cfg), ["", ""], steps=2, seed=3)
    b = generate(Chain(base.extract(cfg), None, prompts_ctx), ["", ""], steps=2, seed=3)
    assert a.shape == (2, 3, base.hyper.frames, 16, 16)
    assert torch.allclose(a, b, atol=1e-4)


def test_chain_reaches_the_requested_resolution(tiny_nets):
    base, ssr = tiny_nets["pixel-base"], tiny_nets["pixel-ssr"]
    chain = Chain(
        base,
        ssr,
        None,
        base_subnet=base.space.smallest(),
        ssr_subnets={32: ssr.space.sample(2, resolution=32), 64: ssr.space.sample(2, resolution=64)},
    )
    video = generate(chain, ["x"], resolution=64, steps=1, seed=0)
    assert video.shape == (1, 3, base.hyper.frames, 64, 64)
    assert video.abs().max() <= 1


def test_training_samples_are_written_beside_the_checkpoint(tmp_path):
    trainer = Trainer(TrainOptions(text_encoder="none", num_videos=4, batch=2, out=str(tmp_path)))
    path = write_training_samples(trainer, steps=1)
    assert path.is_file() and path.parent == tmp_path / "samples" and path.stat().st_size > 100
