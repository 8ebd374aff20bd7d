"""``python -m harness.paper_step`` on the tiny latent preset: one Algorithm-1 step, frozen-rest check on the
real parameter set, checkpoint, memory and time figures (the paper preset runs the same code, by hand)."""

from __future__ import annotations

import pytest
import torch

from harness.paper_step import frozen_digests, main
from harness.training.checkpoint import load_checkpoint
from harness.training.masked_optim import MaskedAdamW, MaskedEMA


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_step")
    args = ["--preset", "tiny", "--latents", "autoencoder", "--out", str(out), "--static-steps", "2"]
    return main(args), out


def test_one_step_keeps_the_rest_frozen_and_reports_its_cost(report):
    r, out = report
    assert r["latents"]["shape"] == [1, 4, 8, 8, 8]  # the tiny autoencoder's latents of a 16 x 32^2 clip
    assert 0 < r["subnet"]["params_fraction"] < 1  # a real subnet, not the whole supernet
    assert r["frozen_rest"]["changed_outside"] == [] and r["frozen_rest"]["tensors_checked"] > 1000
    assert r["state_bytes_per_param"]["tensors"] <= 20.0
    assert r["super_step_s"] > 0 and r["super_over_static"] > 0 and r["peak_rss_gib"] > 0
    assert (out / "report.json").is_file()


def test_the_checkpoint_resumes_into_a_fresh_optimizer(report):
    r, _ = report
    ckpt = load_checkpoint(r["checkpoint"]["path"])
    from search_spaces import build_supernet

    net = build_supernet("latent-unet", "tiny")
    net.load_state_dict(ckpt["model"])
    opt = MaskedAdamW(net.named_parameters())
    opt.load_hyperparameters(ckpt["training"]["optimizer"])
    opt.load_optimizer_state_tensors(ckpt["optimizer"])
    ema = MaskedEMA(net.named_parameters())
    ema.load_state_dict(ckpt["ema"])
    assert len(opt.state) > 0 and all("cells" in s for s in opt.state.values())


def test_the_frozen_rest_check_sees_one_flipped_entry_outside_the_boxes():
    """The check can fail: a weight entry just outside a first-k box changes the digest; one inside does not."""
    from search_spaces import build_supernet

    net = build_supernet("latent-unet", "tiny")
    opt, ema = MaskedAdamW(net.named_parameters()), MaskedEMA(net.named_parameters())
    active = net.active_regions(net.space.sample(3, min_ratio=0.4, min_keep=0.4))
    params = dict(net.named_parameters())
    name = next(n for n, b in active.items() if b and all(box[0].stop < params[n].shape[0] for box in b))
    before = frozen_digests(net, opt, ema, active)
    with torch.no_grad():
        params[name][0].view(-1)[0] += 1.0  # row 0: inside the first-k box
    assert frozen_digests(net, opt, ema, active) == before
    with torch.no_grad():
        params[name][-1].view(-1)[0] += 1.0  # the last row: outside it
    after = frozen_digests(net, opt, ema, active)
    assert [k for k, v in after.items() if before[k] != v] == [f"{name}:weight"]


def test_bad_latents_option_is_one_line():
    with pytest.raises(ValueError, match="--latents"):
        main(["--preset", "tiny", "--latents", "pixels"])
