"""Masked AdamW / clipping / EMA: frozen entries stay bit-identical, active entries follow AdamW."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from harness.training.masked_optim import MaskedAdamW, MaskedEMA, box_to_mask, masked_clip_grad_norm_

HIDDEN, INNER = 6, 7  # full widths of the two hidden layers; conv has 8 output channels


class TinySupernet(nn.Module):
    """conv (8, 4, 3, 3) -> pool -> lin1 (6, 8) -> lin2 reads [h | skip] (7, 6 + 8) -> head (3, 7)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.lin1 = nn.Linear(8, HIDDEN)
        self.lin2 = nn.Linear(HIDDEN + 8, INNER)
        self.head = nn.Linear(INNER, 3)
        self.unused = nn.Linear(3, 3)  # a dropped block: never runs, gets no gradient


@dataclass(frozen=True)
class SubnetConfig:
    channels: int  # active conv output channels (first-k)
    hidden: int  # active lin1 outputs
    inner: int  # active lin2 outputs


FULL = SubnetConfig(8, HIDDEN, INNER)


def sliced_forward(model: TinySupernet, config: SubnetConfig, x: Tensor) -> Tensor:
    """Forward of the subnet with first-k slices; ``x`` is ``(B, 4, H, W)``, output ``(B, 3)``."""
    c, k, m = config.channels, config.hidden, config.inner
    z = torch.tanh(F.conv2d(x, model.conv.weight[:c], model.conv.bias[:c], padding=1)).mean(dim=(2, 3))
    h = torch.tanh(F.linear(z, model.lin1.weight[:k, :c], model.lin1.bias[:k]))
    w2 = torch.cat([model.lin2.weight[:m, :k], model.lin2.weight[:m, HIDDEN : HIDDEN + c]], dim=1)
    u = torch.tanh(F.linear(torch.cat([h, z], dim=1), w2, model.lin2.bias[:m]))
    return F.linear(u, model.head.weight[:, :m], model.head.bias)


def active_masks(model: TinySupernet, config: SubnetConfig) -> dict[str, Tensor | None]:
    """Boolean masks of the entries ``sliced_forward`` reads (the union of two boxes for lin2)."""
    c, k, m = config.channels, config.hidden, config.inner
    masks: dict[str, Tensor | None] = {
        n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()
    }
    masks["conv.weight"][:c] = True
    masks["conv.bias"][:c] = True
    masks["lin1.weight"][:k, :c] = True
    masks["lin1.bias"][:k] = True
    masks["lin2.weight"][:m, :k] = True
    masks["lin2.weight"][:m, HIDDEN : HIDDEN + c] = True
    masks["lin2.bias"][:m] = True
    masks["head.weight"][:, :m] = True
    masks["head.bias"][:] = True
    masks["unused.weight"] = masks["unused.bias"] = None
    return masks


def active_boxes(model: TinySupernet, config: SubnetConfig) -> dict:
    """The same entries as ``active_masks`` as boxes (the trainer's form): two boxes for lin2's [h | skip]."""
    c, k, m = config.channels, config.hidden, config.inner

    def full(p: Tensor) -> tuple[slice, ...]:
        return tuple(slice(0, n) for n in p.shape[1:])

    return {
        "conv.weight": (slice(0, c), *full(model.conv.weight)),
        "conv.bias": (slice(0, c),),
        "lin1.weight": (slice(0, k), slice(0, c)),
        "lin1.bias": (slice(0, k),),
        "lin2.weight": [(slice(0, m), slice(0, k)), (slice(0, m), slice(HIDDEN, HIDDEN + c))],
        "lin2.bias": (slice(0, m),),
        "head.weight": (slice(0, 3), slice(0, m)),
        "head.bias": (slice(0, 3),),
        "unused.weight": None,
    }


def backward(model: TinySupernet, config: SubnetConfig, seed: int) -> None:
    """Set ``.grad`` from a regression loss of the subnet on a seeded batch."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, 5, 5, generator=gen), torch.randn(5, 3, generator=gen)
    model.zero_grad(set_to_none=True)
    F.mse_loss(sliced_forward(model, config, x), y).backward()


def make_model(seed: int = 0) -> TinySupernet:
    torch.manual_seed(seed)
    return TinySupernet()


def masked_step(
    model: TinySupernet,
    opt: MaskedAdamW,
    ema: MaskedEMA,
    config: SubnetConfig,
    seed: int,
    boxes: bool = False,
) -> None:
    backward(model, config, seed)
    masks = (active_boxes if boxes else active_masks)(model, config)
    opt.step(masks)
    ema.update(model.named_parameters(), masks)


WARM_CONFIGS = [FULL, SubnetConfig(5, 4, 6), SubnetConfig(3, 2, 3)]
TEST_CONFIG = SubnetConfig(4, 3, 5)


def snapshot(model: nn.Module, opt: MaskedAdamW, ema: MaskedEMA) -> dict[str, Tensor]:
    """Every entry's state, whatever the storage: weights, moments, per-entry step and warm-up counts, EMA."""
    tensors = {f"{n}.weight_value": p.detach().clone() for n, p in model.named_parameters()}
    moments = {
        k: v for k, v in opt.optimizer_state_tensors().items() if k.endswith(("exp_avg", "exp_avg_sq"))
    }
    steps = {f"{n}.step": c for n, c in opt.step_counts().items()}
    shadows = {f"{n}.ema": s.clone() for n, s in ema.averaged_parameters().items()}
    warmups = {f"{n}.ema_count": c for n, c in ema.update_counts().items()}
    return tensors | moments | steps | shadows | warmups


@pytest.mark.parametrize("boxes", [True, False])
def test_one_masked_step_freezes_every_entry_outside_the_masks(boxes: bool) -> None:
    model = make_model()
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    ema = MaskedEMA(model.named_parameters(), decay=0.9)
    for i, config in enumerate(WARM_CONFIGS):
        masked_step(model, opt, ema, config, seed=i, boxes=boxes)
    before = snapshot(model, opt, ema)
    masked_step(model, opt, ema, TEST_CONFIG, seed=99, boxes=boxes)
    after = snapshot(model, opt, ema)
    masks = active_masks(model, TEST_CONFIG)

    assert set(before) == set(after)
    assert "unused.weight.exp_avg" not in after  # a parameter never used never gets optimizer state
    checked = 0
    for key in before:
        name = key.rsplit(".", 1)[0]
        mask = masks[name]
        if mask is None:
            assert torch.equal(before[key], after[key]), key
            continue
        assert torch.equal(before[key][~mask], after[key][~mask]), key
        if key.endswith(("step", "ema_count")):
            assert torch.equal(after[key][mask], before[key][mask] + 1), key
        else:
            assert (after[key][mask] != before[key][mask]).all(), key
        checked += 1
    assert checked == 8 * 6  # 8 used params x (weight, exp_avg, exp_avg_sq, step, ema, ema_count)


@pytest.mark.parametrize("weight_decay", [0.01, 0.0])
def test_plain_adamw_moves_inactive_entries(weight_decay: float) -> None:
    """Why MaskedAdamW exists: torch's AdamW changes entries outside the slice (decay and momentum)."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay, foreach=False)
    for i, config in enumerate(WARM_CONFIGS):
        backward(model, config, seed=i)
        opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model, TEST_CONFIG, seed=99)
    opt.step()
    mask = active_masks(model, TEST_CONFIG)["lin2.weight"]
    assert mask is not None
    assert (model.lin2.weight.grad[~mask] == 0).all()  # zero gradient outside the slice...
    assert (model.lin2.weight.detach()[~mask] != before["lin2.weight"][~mask]).all()  # ...yet it moved


def test_all_true_masks_equal_torch_adamw() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (6, 8), (6,)]
    ours = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    hyper = {"lr": 3e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}
    opt = MaskedAdamW([(str(i), p) for i, p in enumerate(ours)], **hyper)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **hyper)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step({str(i): torch.ones_like(p, dtype=torch.bool) for i, p in enumerate(ours)})
        ref_opt.step()
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], ref_opt.state[b]["exp_avg"])
        assert torch.equal(opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"])
        assert (opt.state[a]["step"] == 5).all()


def test_per_entry_step_counts_give_per_entry_bias_correction() -> None:
    """Entry 0 is updated 5 times, entry 1 twice: each equals AdamW run on that entry alone."""
    hyper = {"lr": 1e-1, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.02}
    param = nn.Parameter(torch.tensor([0.5, -1.5]))
    opt = MaskedAdamW([("w", param)], **hyper)
    grads = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    entry1_steps = [1, 3]
    for t in range(5):
        param.grad = grads[t].clone()
        opt.step({"w": torch.tensor([True, t in entry1_steps])})
    assert opt.state[param]["step"].tolist() == [5, 2]

    for entry, steps in [(0, range(5)), (1, entry1_steps)]:
        ref = nn.Parameter(torch.tensor([[0.5, -1.5][entry]]))
        ref_opt = torch.optim.AdamW([ref], foreach=False, **hyper)
        for t in steps:
            ref.grad = grads[t, entry : entry + 1].clone()
            ref_opt.step()
        assert torch.equal(param.detach()[entry : entry + 1], ref.detach())


def run_steps(
    model: TinySupernet,
    opt: MaskedAdamW,
    ema: MaskedEMA,
    configs: list[SubnetConfig],
    seed0: int,
    boxes: bool = False,
) -> None:
    for i, config in enumerate(configs):
        masked_step(model, opt, ema, config, seed=seed0 + i, boxes=boxes)


@pytest.mark.parametrize("boxes", [True, False])
def test_state_round_trip_through_safetensors_is_bit_exact(tmp_path: Path, boxes: bool) -> None:
    steps_a, steps_b = WARM_CONFIGS, [TEST_CONFIG, SubnetConfig(2, 6, 1), FULL]
    straight = make_model()
    opt = MaskedAdamW(straight.named_parameters(), lr=1e-2, weight_decay=0.1)
    ema = MaskedEMA(straight.named_parameters(), decay=0.95)
    run_steps(straight, opt, ema, steps_a, seed0=0, boxes=boxes)

    # Save weights, optimizer state, EMA and hyperparameters; resume in fresh objects.
    save_file({n: p.detach().clone() for n, p in straight.named_parameters()}, tmp_path / "model.safetensors")
    save_file(opt.optimizer_state_tensors(), tmp_path / "optim.safetensors")
    save_file(ema.state_dict(), tmp_path / "ema.safetensors")
    (tmp_path / "optim.json").write_text(json.dumps(opt.hyperparameters()))
    resumed = make_model(seed=123)
    resumed.load_state_dict(load_file(tmp_path / "model.safetensors"))
    opt2 = MaskedAdamW(resumed.named_parameters())
    opt2.load_hyperparameters(json.loads((tmp_path / "optim.json").read_text()))
    opt2.load_optimizer_state_tensors(load_file(tmp_path / "optim.safetensors"))
    ema2 = MaskedEMA(resumed.named_parameters(), decay=0.95)
    ema2.load_state_dict(load_file(tmp_path / "ema.safetensors"))

    run_steps(straight, opt, ema, steps_b, seed0=10, boxes=boxes)
    run_steps(resumed, opt2, ema2, steps_b, seed0=10, boxes=boxes)
    a, b = snapshot(straight, opt, ema), snapshot(resumed, opt2, ema2)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert opt.hyperparameters() == opt2.hyperparameters()


@pytest.mark.parametrize("boxes", [True, False])
def test_torch_state_dict_round_trip_is_bit_exact(boxes: bool) -> None:
    straight = make_model()
    opt = MaskedAdamW(straight.named_parameters(), lr=1e-2)
    ema = MaskedEMA(straight.named_parameters(), warmup=False)
    run_steps(straight, opt, ema, WARM_CONFIGS, seed0=0, boxes=boxes)
    resumed = make_model()
    resumed.load_state_dict(straight.state_dict())
    opt2 = MaskedAdamW(resumed.named_parameters())
    opt2.load_state_dict(opt.state_dict())
    ema2 = MaskedEMA(resumed.named_parameters(), warmup=False)
    ema2.load_state_dict(ema.state_dict())
    run_steps(straight, opt, ema, [TEST_CONFIG, FULL], seed0=10, boxes=boxes)
    run_steps(resumed, opt2, ema2, [TEST_CONFIG, FULL], seed0=10, boxes=boxes)
    a, b = snapshot(straight, opt, ema), snapshot(resumed, opt2, ema2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_masked_clip_grad_norm_uses_and_scales_active_entries_only() -> None:
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    masks = active_masks(model, TEST_CONFIG)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    active = [before[n][m] for n, m in masks.items() if m is not None]
    expected = torch.linalg.vector_norm(torch.cat(active))

    total = masked_clip_grad_norm_(model.named_parameters(), masks, max_norm=0.5)
    assert torch.allclose(total, expected, rtol=1e-6, atol=0)
    coef = 0.5 / (expected + 1e-6)
    for name, p in model.named_parameters():
        mask = masks[name]
        if mask is None:
            assert torch.equal(p.grad, before[name])
            continue
        assert torch.equal(p.grad[~mask], before[name][~mask])
        assert torch.allclose(p.grad[mask], before[name][mask] * coef, rtol=1e-6, atol=0)
    assert torch.allclose(
        masked_clip_grad_norm_(model.named_parameters(), masks, max_norm=0.5), torch.tensor(0.5)
    )


def test_ema_warmup_copy_to_and_bad_masks() -> None:
    model = make_model()
    ema = MaskedEMA(model.named_parameters(), decay=0.999)
    old = ema.averaged_parameters()["head.bias"].clone()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    masks = active_masks(model, FULL)
    ema.update(model.named_parameters(), masks)
    # First update: d = min(0.999, 1 / 10) = 0.1, so the EMA moves 90 % of the way.
    assert torch.allclose(ema.averaged_parameters()["head.bias"], old + 0.9)
    target = make_model(seed=5)
    ema.copy_to(target)
    assert all(torch.equal(p, ema.shadow[n]) for n, p in target.named_parameters())

    opt = MaskedAdamW(model.named_parameters())
    backward(model, FULL, seed=0)
    with pytest.raises(KeyError):
        opt.step({"nope": None})
    with pytest.raises(ValueError):
        opt.step({"head.bias": torch.ones(2, dtype=torch.bool)})


def _boxes_and_masks(params: dict[str, Tensor], seed: int):
    """A random leading box per parameter, as a box and as the equivalent mask."""
    from harness.training.masked_optim import box_to_mask

    rng = torch.Generator().manual_seed(seed)
    boxes = {
        n: tuple(slice(0, int(torch.randint(1, d + 1, (1,), generator=rng))) for d in p.shape)
        for n, p in params.items()
    }
    return boxes, {n: box_to_mask(params[n], b) for n, b in boxes.items()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_box_regions_are_bit_identical_to_masks(weight_decay: float) -> None:
    """The fast path (leading boxes, in place, ``_foreach``) against the mask path over several steps:
    weights, Adam state, step counts, EMA and EMA counts all equal bit for bit."""
    runs = []
    for use_boxes in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Conv1d(8, 5, 3))
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=weight_decay)
        ema = MaskedEMA(model.named_parameters(), decay=0.9)
        for step in range(4):
            boxes, masks = _boxes_and_masks(dict(model.named_parameters()), seed=step)
            active = boxes if use_boxes else masks
            g = torch.Generator().manual_seed(100 + step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(active)
            ema.update(model.named_parameters(), active)
        runs.append(snapshot(model, opt, ema))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_box_clipping_scales_only_the_box() -> None:
    params = {"a": nn.Parameter(torch.zeros(4, 3)), "b": nn.Parameter(torch.zeros(5))}
    boxes, masks = _boxes_and_masks(params, seed=3)
    grads = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 10 for n, p in params.items()
    }
    results = []
    for active in (masks, boxes):
        for n, p in params.items():
            p.grad = grads[n].clone()
        norm = masked_clip_grad_norm_(params.items(), active, max_norm=1.0)
        results.append((norm, {n: p.grad.clone() for n, p in params.items()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for n in params:
        torch.testing.assert_close(results[0][1][n], results[1][1][n])
        assert torch.equal(results[1][1][n][~masks[n]], grads[n][~masks[n]])


def test_bad_boxes_are_refused() -> None:
    model = nn.Linear(3, 2)
    opt = MaskedAdamW(model.named_parameters())
    model.weight.grad = torch.ones(2, 3)
    with pytest.raises(ValueError, match="one slice"):
        opt.step({"weight": (slice(0, 1),)})
    with pytest.raises(ValueError, match="one slice"):
        opt.step({"weight": (slice(0, 2), slice(0, 4))})  # past the end of the parameter


# -- cell step counts (exact per-entry counts without per-entry state) ------------------------------------
def test_cell_counts_equal_per_entry_counting_under_random_first_k_boxes() -> None:
    """Random leading boxes and [h | skip] box pairs on a (9, 14, 3) tensor: the cells' counts, expanded,
    equal a per-entry int tensor counted by brute force; every returned block has one count throughout."""
    from harness.training.cell_counts import CellCounts

    shape, rng = (9, 14, 3), torch.Generator().manual_seed(0)
    cells, brute = CellCounts(shape), torch.zeros(shape, dtype=torch.int32)

    def draw(n: int) -> int:
        return int(torch.randint(0, n + 1, (1,), generator=rng))

    for _ in range(40):
        m, k, c = draw(9), draw(6), draw(8)
        boxes = [(slice(0, m), slice(0, k), slice(0, 3)), (slice(0, m), slice(6, 6 + c), slice(0, draw(3)))]
        blocks = cells.update(boxes)
        for box in boxes:
            brute[box] += 1
        assert torch.equal(cells.per_entry(), brute)
        covered = torch.zeros(shape, dtype=torch.int32)
        for box, count in blocks:
            assert (brute[box] == count).all()
            covered[box] += 1
        assert torch.equal(covered, box_to_mask(brute, boxes).to(torch.int32))  # blocks tile the boxes
    assert cells.counts.shape == tuple(len(c) - 1 for c in cells.cuts)  # one count per cell of the grid
    cuts, counts = cells.to_tensors()
    assert torch.equal(CellCounts.from_tensors(shape, cuts, counts).per_entry(), brute)
    few = CellCounts((30, 40, 3))  # the old per-entry format converts back to the same grid
    for m, k in [(30, 40), (12, 20), (20, 7), (5, 40)]:
        few.update([(slice(0, m), slice(0, k), slice(0, 3))])
    converted = CellCounts.from_per_entry(few.per_entry())
    assert converted is not None and converted.cuts == few.cuts and (converted.counts == few.counts).all()
    with pytest.raises(ValueError, match="overlap"):
        cells.update([(slice(0, 2), slice(0, 2), slice(0, 1)), (slice(1, 3), slice(0, 2), slice(0, 1))])
    assert torch.equal(cells.per_entry(), brute)  # a refused update moves no count
    scattered = torch.randint(0, 2, (20, 20), generator=rng, dtype=torch.int32)  # counts of random masks
    assert CellCounts.from_per_entry(scattered) is None


@pytest.mark.parametrize("foreach", [False, True])
def test_all_true_boxes_equal_torch_adamw(foreach: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (6, 8), (6,), ()]
    ours = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    hyper = {"lr": 3e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}
    opt = MaskedAdamW([(str(i), p) for i, p in enumerate(ours)], **hyper)
    ref_opt = torch.optim.AdamW(ref, foreach=foreach, **hyper)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step({str(i): tuple(slice(0, n) for n in p.shape) for i, p in enumerate(ours)})
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], ref_opt.state[b]["exp_avg"])
        assert torch.equal(opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"])
    assert all((c == 5).all() for c in opt.step_counts().values())


def test_box_step_counts_give_per_entry_bias_correction() -> None:
    """Entry 0 is in the box 5 times, entry 1 twice: each equals AdamW run on that entry alone."""
    hyper = {"lr": 1e-1, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.02}
    param = nn.Parameter(torch.tensor([0.5, -1.5]))
    opt = MaskedAdamW([("w", param)], **hyper)
    grads = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    entry1_steps = [1, 3]
    for t in range(5):
        param.grad = grads[t].clone()
        opt.step({"w": (slice(0, 2 if t in entry1_steps else 1),)})
    assert opt.step_counts()["w"].tolist() == [5, 2]
    assert "step" not in opt.state[param]  # no per-entry tensor: two cells
    for entry, steps in [(0, range(5)), (1, entry1_steps)]:
        ref = nn.Parameter(torch.tensor([[0.5, -1.5][entry]]))
        ref_opt = torch.optim.AdamW([ref], foreach=False, **hyper)
        for t in steps:
            ref.grad = grads[t, entry : entry + 1].clone()
            ref_opt.step()
        assert torch.equal(param.detach()[entry : entry + 1], ref.detach())


def _old_format(tensors: dict[str, Tensor], shapes: dict, kind: str, entry: str) -> dict[str, Tensor]:
    """A state dict in the pre-cell format: per-entry int32 ``.step`` / ``.ema_count`` tensors."""
    from harness.training.cell_counts import CellCounts

    out = {k: v for k, v in tensors.items() if not k.endswith((f".{kind}_cuts", f".{kind}_counts"))}
    for key, value in tensors.items():
        if key.endswith(f".{kind}_cuts"):
            name = key[: -len(f".{kind}_cuts")]
            grid = CellCounts.from_tensors(shapes[name], value, tensors[f"{name}.{kind}_counts"])
            out[f"{name}.{entry}"] = grid.per_entry()
    return out


def test_old_per_entry_checkpoints_load_and_resume_bit_exactly() -> None:
    straight = make_model()
    opt = MaskedAdamW(straight.named_parameters(), lr=1e-2, weight_decay=0.1)
    ema = MaskedEMA(straight.named_parameters(), decay=0.95)
    run_steps(straight, opt, ema, WARM_CONFIGS, seed0=0, boxes=True)
    shapes = {n: p.shape for n, p in straight.named_parameters()}
    old_opt = _old_format(opt.optimizer_state_tensors(), shapes, "step", "step")
    old_ema = _old_format(ema.state_dict(), shapes, "ema", "ema_count")
    assert "lin2.weight.step" in old_opt and "lin2.weight.ema_count" in old_ema

    resumed = make_model(seed=7)
    resumed.load_state_dict(straight.state_dict())
    opt2 = MaskedAdamW(resumed.named_parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_optimizer_state_tensors(old_opt)
    ema2 = MaskedEMA(resumed.named_parameters(), decay=0.95)
    ema2.load_state_dict(old_ema)
    assert all("cells" in s for s in opt2.state.values())  # converted, no per-entry tensor kept
    later = [TEST_CONFIG, SubnetConfig(2, 6, 1), FULL]
    run_steps(straight, opt, ema, later, seed0=10, boxes=True)
    run_steps(resumed, opt2, ema2, later, seed0=10, boxes=True)
    a, b = snapshot(straight, opt, ema), snapshot(resumed, opt2, ema2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert opt.optimizer_state_tensors().keys() == opt2.optimizer_state_tensors().keys()


def test_a_mask_after_boxes_switches_to_per_entry_counts_and_stays_exact() -> None:
    runs = []
    for first_boxes in (True, False):
        model = make_model()
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
        ema = MaskedEMA(model.named_parameters(), decay=0.9)
        run_steps(model, opt, ema, WARM_CONFIGS, seed0=0, boxes=first_boxes)
        run_steps(model, opt, ema, [TEST_CONFIG], seed0=5, boxes=False)
        run_steps(model, opt, ema, [SubnetConfig(2, 6, 1)], seed0=6, boxes=True)
        runs.append(snapshot(model, opt, ema))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# -- memory, measured on a real supernet step -----------------------------------------------------------
def test_state_is_20_bytes_per_param_and_the_step_transient_under_4_per_active_param() -> None:
    """A tiny pixel-base supernet, three Algorithm-1 steps (sampled subnets, their boxes), then a measured
    fourth: every tensor held between steps is 20 B/param (w, g, m, v, EMA); the host's cell counts are a
    rounding error; the new storages alive at once inside clip + AdamW + EMA stay under 4 B/active param."""
    from harness.training.optim_memory import TransientPeak, state_bytes
    from search_spaces import build_supernet

    torch.manual_seed(0)
    net = build_supernet("pixel-base", "tiny")
    opt = MaskedAdamW(net.named_parameters(), lr=1e-3, weight_decay=0.01)
    ema = MaskedEMA(net.named_parameters(), decay=0.999)
    rng = torch.Generator().manual_seed(0)
    for step in range(4):
        cfg = net.space.sample(step + 1, min_ratio=0.4, min_keep=0.4)
        inputs = net.dummy_inputs(cfg, seed=step)
        net.zero_grad(set_to_none=True)
        out = net(inputs.pop("sample"), inputs.pop("timestep"), subnet=cfg, **inputs)
        F.mse_loss(out, torch.randn(out.shape, generator=rng)).backward()
        active = net.active_regions(cfg)
        if step == 3:
            before = {n: p.detach().clone() for n, p in net.named_parameters()}
            with TransientPeak() as peak:
                masked_clip_grad_norm_(net.named_parameters(), active, 1.0)
                opt.step(active)
                ema.update(net.named_parameters(), active)
        else:
            masked_clip_grad_norm_(net.named_parameters(), active, 1.0)
            opt.step(active)
            ema.update(net.named_parameters(), active)
    assert not any(
        isinstance(v, Tensor) and v.dtype == torch.int32 for s in opt.state.values() for v in s.values()
    )
    sizes = state_bytes(net, opt, ema)
    assert sizes.tensor_bytes_per_param <= 20.0, sizes  # < 20: dropped blocks have no grad / state yet
    stateful = sum(p.numel() for p in opt.state)
    assert sizes.optimizer == 8 * stateful and sizes.ema == 4 * sizes.params, sizes  # m, v; EMA: nothing more
    assert sizes.host_bytes_per_param < 0.1, sizes
    n_active = sum(box_to_mask(p, active[n]).sum().item() for n, p in net.named_parameters() if active.get(n))
    assert 0 < peak.peak <= 4 * n_active, (peak.peak, n_active)
    moved = sum(int(not torch.equal(before[n], p)) for n, p in net.named_parameters())
    assert moved > 0
