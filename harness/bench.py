"""``python -m harness.bench``: the regression suite, gated against ``results/baselines/bench.json``.

Every figure is judged by the gate stored beside its baseline value (``harness.bench_gates``): a
direction (lower / higher is better, both, info) and an allowance (relative, absolute, or a fixed limit).
The groups' code only proposes gates; ``--update`` is the one way to write values and gates, so editing
a tolerance here loosens nothing until it is deliberately adopted. A missing or malformed baselines file,
or a figure without a stored baseline, is an error rather than a pass.

Deterministic figures (parameters, FLOPs, Callgrind instruction counts when valgrind is installed) are
gated exactly or tightly. Quality figures are one-sided (a better FVD is no regression), the FVD gates
sized from the figure's own jackknife SE. Speed figures are ratios or ranks measured in this same run
(sliced / static latency, supernet / static training step, 100% / 40% speedup, repeatability of two
interleaved rounds of latency readings), one-sided, from contention-checked readings
(``harness.measurement.timing``): when the machine stays too busy for a clean reading the run exits 3 and
says so, rather than reporting a regression. Prints a table (metric, baseline, current, tolerance,
verdict), writes a JSON report, and exits non-zero on a regression.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from harness.bench_gates import (
    FAILING,
    UPDATE_HINT,
    Figure,
    Gate,
    compare,
    load_baselines,
    updated,
    write_baselines,
)
from harness.cli import run_cli
from harness.device_policy import DevicePolicy, add_device_arguments, deployed, policy_from_args
from harness.measurement.timing import MachineBusy
from harness.metrics.flops import denoiser_flops
from harness.metrics.latency import device_description, measure_latency
from harness.models import load_bundle
from harness.paths import DEFAULT_BASE, RESULTS
from harness.training.masked_optim import MaskedAdamW
from search_spaces import build_supernet

BASELINES = RESULTS / "baselines" / "bench.json"
MOTION_FLOOR = {"largest": 0.75, "p40": 0.5}  # fraction of 16 videos; the shipped base scores 1.0 on both
GROUPS = ("counts", "roofline", "latency", "training", "quality", "instructions")
DEFAULT_GROUPS = GROUPS[:-1]  # instruction counts take minutes under valgrind: --only instructions
DEFAULT_MODELLED = "modelled:a100-sxm4-80gb:bf16"  # the roofline group's device: the paper's A100
# Latency repeatability (two interleaved rounds of robust readings, 12 random subnets) is reported, not
# gated (see latency_figures). On an Intel 2-core VM it gave Spearman 0.937 and a median difference of
# 4.1 %, the figure the speedup gate's noise estimate below comes from.
# The 100 % / 40 % speedup, gated relative to its baseline. It was ">= 1.2" against a baseline of 1.714,
# which let the 40 % subnet become 42 % slower (1.714 / 1.2) unnoticed. Measured noise: the median
# relative difference of two robust readings of a subnet was 4.1 % (above), i.e. sigma = 4.1 / 0.954 =
# 4.3 % a reading (the median of |N(0, 2 sigma^2)| is 0.954 sigma; the timing SE floor says 3 %). The
# speedup is a ratio of two means of two readings (sigma 4.3 %), two runs differ by sqrt(2) x 4.3 % = 6.1 %,
# and 1.96 of those is 12 %, rounded up to 15 % for the heavy tail that the readings' 50 % spread limit
# admits. The gate now fails a 40 % subnet 18 % slower (speedup / 1.18); 30 % slower fails by far.
SPEEDUP_GATE = Gate("higher", rel=0.15, why="1.96 x 6.1 % run-to-run noise, rounded up")


# -- figures -----------------------------------------------------------------------------------------
def _named_subnets(net):
    space = net.space
    out = {"largest": space.largest(), "smallest": space.smallest()}
    out.update({f"p{int(f * 100)}": space.subnet_at_fraction(f) for f in (0.4, 0.6, 0.8)})
    return out


def counts() -> dict[str, Figure]:
    """Exact parameter and FLOP counts of fixed subnets (1 multiply-add = 1 FLOP, batch 1, 12 frames):
    gated both ways, since any change means the search space changed."""
    out = {}
    for family in ("pixel-base", "pixel-ssr"):
        net = build_supernet(family, "tiny")
        for name, cfg in _named_subnets(net).items():
            out[f"{family}/{name}/params"] = Figure(net.count_params(cfg), Gate.exact("architecture"))
            out[f"{family}/{name}/flops"] = Figure(
                denoiser_flops(net, cfg, batch=1), Gate.exact("architecture")
            )
    return out


def _inputs(net, cfg, device) -> dict:
    """The guidance-pair inputs, drawn on the CPU (the same on every device) and moved to ``device``."""
    with torch.device("cpu"):
        return {k: v.to(device) for k, v in net.dummy_inputs(cfg, batch_size=2).items()}


def _reader(net, threads: int, timing, policy: DevicePolicy):
    """A robust reading (``harness.measurement.timing``) of a callable, with the contention probe on the
    space's smallest subnet under the guidance-pair inputs, deployed under ``policy``."""
    from harness.measurement.timing import probe_for, robust_reading

    def make_reference():
        cfg = net.space.smallest()
        return deployed(net.extract(cfg).eval(), _inputs(net, cfg, policy.device), policy)

    key = ("bench", net.family, net.preset, threads) + (() if policy.is_default else (policy,))
    probe = probe_for(key, make_reference, policy.torch_device)
    return lambda fn: robust_reading(fn, probe, timing, threads, policy.device).value_ms


def _static_reading(read, net, cfg, policy: DevicePolicy) -> float:
    return read(deployed(net.extract(cfg).eval(), _inputs(net, cfg, policy.device), policy))


def repeatability(first: list[float], second: list[float]) -> tuple[float, float]:
    """Spearman rank correlation and median relative difference |a - b| / min(a, b) of two readings of
    the same subnets."""
    from scipy.stats import spearmanr

    a, b = np.asarray(first), np.asarray(second)
    return float(spearmanr(a, b).statistic), float(np.median(np.abs(a - b) / np.minimum(a, b)))


def latency(
    threads: int, n_configs: int = 10, n_repeat: int = 12, policy: DevicePolicy | None = None
) -> dict[str, Figure]:
    """Latency figures, each a ratio or a rank measured in this run, every timing a clean robust reading
    of the default protocol (``MeasureSettings().timing``; a busy machine is retried, then reported):

    - sliced supernet / extracted static latency (one forward, CFG batch of 2) over random configs;
    - the 100 % / 40 % subnet speedup (each read twice, interleaved, medians);
    - repeatability: two interleaved rounds of readings of ``n_repeat`` random subnets (shuffled orders),
      their Spearman and median relative difference, and, for comparison, the same for one
      ``measure_latency(min_run_time=0.25)`` reading each (the protocol before robust readings).

    Every forward runs under ``policy`` (default: fp32 eager on the CPU); the sliced supernet is timed
    eagerly under its precision (compiling a supernet per config is not what a search times)."""
    from harness.measurement.settings import MeasureSettings

    policy = policy or DevicePolicy()
    net = build_supernet("pixel-base", "tiny").eval().to(policy.torch_device)
    read = _reader(net, threads, MeasureSettings().timing, policy)
    eager = DevicePolicy(policy.device, policy.precision)
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(n_configs):
        cfg = net.space.sample(rng)
        inputs = _inputs(net, cfg, policy.device)

        def sliced_fn(inputs=inputs, cfg=cfg):
            with eager.autocast():
                return net(**inputs, subnet=cfg)

        sliced = read(sliced_fn)
        ratios.append(sliced / _static_reading(read, net, cfg, eager))
    big_cfg, small_cfg = net.space.largest(), net.space.subnet_at_fraction(0.4)
    pairs = [
        (_static_reading(read, net, big_cfg, policy), _static_reading(read, net, small_cfg, policy))
        for _ in range(2)
    ]
    speedup = statistics.median(b for b, _ in pairs) / statistics.median(s for _, s in pairs)
    cfgs = [net.space.sample(rng) for _ in range(n_repeat)]
    rounds: dict[str, list[dict[int, float]]] = {"robust": [{}, {}], "single": [{}, {}]}
    for r in range(2):
        for i in rng.permutation(n_repeat):
            rounds["robust"][r][i] = _static_reading(read, net, cfgs[i], policy)
            static, inputs = net.extract(cfgs[i]).eval(), _inputs(net, cfgs[i], policy.device)
            rounds["single"][r][i] = measure_latency(
                static, inputs, device=policy.device, threads=threads, min_run_time=0.25, policy=policy
            ).median_ms
    rep = {k: repeatability([v[0][i] for i in range(n_repeat)], [v[1][i] for i in range(n_repeat)])
           for k, v in rounds.items()}  # fmt: skip
    q1, q3 = np.percentile(ratios, [25, 75])
    return {
        "latency/sliced_over_static_median": Figure(
            statistics.median(ratios), Gate.at_most(1.25, "slicing overhead bound")
        ),
        "latency/sliced_over_static_iqr": Figure(float(q3 - q1), Gate.info()),
        "latency/speedup_100_over_40": Figure(speedup, SPEEDUP_GATE),
        # Reported, not gated: the machine's own noise, not the code's. Four quiet runs on one 2-core AMD
        # EPYC VM (2026-12-02) gave Spearman 0.930 / 0.839 / 0.832 / 0.517 (an Intel VM 0.937, worst pair 0.891).
        "latency/repeat_spearman": Figure(rep["robust"][0], Gate.info()),
        "latency/repeat_median_rel_diff": Figure(rep["robust"][1], Gate.info()),
        "latency/single_reading_repeat_spearman": Figure(rep["single"][0], Gate.info()),
        "latency/single_reading_repeat_median_rel_diff": Figure(rep["single"][1], Gate.info()),
    }


def instructions() -> dict[str, Figure]:
    """Callgrind instruction count of one forward of the 40 % subnet of the tiny base (guidance pair,
    12 frames, 16 px, one thread): deterministic, so gated tightly (repeats agreed to 0.02 %; the gate
    allows 0.5 % for a changed glibc or valgrind). Needs valgrind (``harness.metrics.instructions``)."""
    from harness.metrics.instructions import forward_instructions

    net = build_supernet("pixel-base", "tiny")
    count = forward_instructions("pixel-base", "tiny", net.space.subnet_at_fraction(0.4), batch=2)
    gate = Gate("lower", rel=0.005, why="repeats agree to 0.02-0.15 %; fewer instructions is no regression")
    return {"instructions/pixel-base/p40/forward": Figure(float(count.count), gate)}


def roofline(mode: str = DEFAULT_MODELLED) -> dict[str, Figure]:
    """Modelled latency (``harness.roofline``, ``--latency modelled:<device>[:<precision>]``) of one
    denoiser step (guidance pair) of the tiny base's 40 % and largest subnets and of the paper preset's
    SNED-S and SNED-B, and the two 100 % / 40 % speedups (the paper's Table 1 reports 1.53x on an A100).
    The model is deterministic, so every figure is gated both ways: a change means the catalogue, the
    efficiencies, the per-op cost trace or the architecture changed, and is adopted with ``--update``."""
    from harness.roofline.fit import load_model
    from harness.roofline.metric import parse_modelled
    from harness.roofline.model import denoiser_ops

    key, precision = parse_modelled(mode)
    model = load_model(key, precision)
    gate = Gate("both", rel=1e-6, why="deterministic model of a catalogued device")
    out = {}
    for preset, names in (("tiny", ("p40", "largest")), ("paper", ("SNED-S", "SNED-B"))):
        with torch.device("meta"):  # shapes only: the paper preset's 1.6B parameters are never allocated
            net = build_supernet("pixel-base", preset)
        step = {}
        for name, fraction in zip(names, (0.4, 1.0)):
            arrays = denoiser_ops(
                net, net.space.subnet_at_fraction(fraction), net.hyper.frames, 2, model.dtype
            )
            step[name] = model.forward(arrays).seconds * 1e3
            out[f"roofline/{key}:{precision}/{preset}/{name}/step_ms"] = Figure(step[name], gate)
        speedup = step[names[1]] / step[names[0]]
        out[f"roofline/{key}:{precision}/{preset}/speedup_100_over_40"] = Figure(speedup, gate)
    return out


def _train_step_time(model, forward, params, masks, repeats: int = 3) -> float:
    opt = (
        MaskedAdamW(params, lr=1e-4)
        if masks is not None
        else torch.optim.AdamW([p for _, p in params], lr=1e-4)
    )
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        forward().square().mean().backward()
        opt.step(masks(model)) if masks is not None else opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def training(threads: int, n_configs: int = 6, batch: int = 4) -> dict[str, Figure]:
    """Training step (forward + backward + update) of the supernet at a sampled config with the masked
    optimizer, over the same step of the extracted static subnet with AdamW; median over configs."""
    torch.set_num_threads(threads)
    net = build_supernet("pixel-base", "tiny")
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(n_configs):
        cfg = net.space.sample(rng)
        inputs = net.dummy_inputs(cfg, batch_size=batch)
        static = net.extract(cfg)
        t_super = _train_step_time(
            net,
            lambda inputs=inputs, cfg=cfg: net(**inputs, subnet=cfg),
            list(net.named_parameters()),
            lambda m, cfg=cfg: m.active_regions(cfg),
        )
        t_static = _train_step_time(
            static,
            lambda static=static, inputs=inputs: static(**inputs),
            list(static.named_parameters()),
            None,
        )
        ratios.append(t_super / t_static)
    gate = Gate.at_most(1.35, "masked-update overhead bound")
    return {"training/super_over_static_step_median": Figure(statistics.median(ratios), gate)}


def quality(policy: DevicePolicy | None = None) -> dict[str, Figure]:
    """Offline-extractor FVD of the shipped supernet's largest and 40% subnets at fixed seeds, and how many
    of those videos move the way their prompt says (the synthetic data's motion check; a floor, chance is
    0.25): the quality metric of a search, computed without a store."""
    from harness.candidates import Candidate
    from harness.measurement import FrechetQuality, Generation, MeasureSettings

    policy = policy or DevicePolicy()
    base = load_bundle(DEFAULT_BASE)
    settings = MeasureSettings(fvd_videos=16, real_videos=128, steps=8, seed=0, checks=("motion_alignment",),
                               device=policy.device, precision=policy.precision)  # fmt: skip
    policy.place(base)
    metric = FrechetQuality(
        Generation(base, None, settings.steps, settings.guidance, settings.policy),
        base.text_encoder.load(policy.device),
        settings,
    )
    out = {}
    for name, cfg in (
        ("largest", base.supernet.space.largest()),
        ("p40", base.supernet.space.subnet_at_fraction(0.4)),
    ):
        values, extra = metric.compute(Candidate(cfg))  # FVD and motion from the same videos
        # One-sided, sized from the figure's own jackknife SE ("fvd_std" is the SE by contract).
        fvd, se = float(values["fvd"]), float(values["fvd_std"])
        out[f"quality/{name}/fvd16_proxy"] = Figure(fvd, Gate.quality(se), se=se)
        motion = extra["checks"]["motion_alignment"]["fraction"]
        out[f"quality/{name}/motion_alignment16"] = Figure(
            motion, Gate.at_least(MOTION_FLOOR[name], "floor; chance is 0.25")
        )
    from harness.measurement.quality import settings_floor

    # The default (main-job) protocol's floor: held-out real clips scored as generated ones, deterministic.
    floor = settings_floor(MeasureSettings(), base.frames, base.default_resolution, cache_dir=None)
    # Two-sided: the floor is the protocol's reference, not a quality (neither direction is better), and
    # any change beyond 2 % means the real or held-out clips of the protocol changed.
    out["quality/default_protocol/fvd_floor"] = Figure(
        floor.fvd, Gate("both", rel=0.02, why="deterministic protocol reference")
    )
    out["quality/default_protocol/fvd_floor_se"] = Figure(floor.fvd_se, Gate.info())
    return out


# -- gating (harness.bench_gates) ----------------------------------------------------------------------
def _print_table(rows: list[dict]) -> None:
    width = max(len(r["metric"]) for r in rows)
    print(f"{'metric':<{width}}  {'baseline':>14}  {'current':>14}  {'tolerance':>10}  verdict")
    for r in rows:
        b = "-" if r["baseline"] is None else f"{r['baseline']:.6g}"
        print(f"{r['metric']:<{width}}  {b:>14}  {r['current']:>14.6g}  {r['tolerance']:>10}  {r['verdict']}")
    proposed = [r["metric"] for r in rows if "code_gate" in r]
    if proposed:  # a tolerance edited in the code is not used until --update writes it
        print(
            f"note: the code proposes other gates for {len(proposed)} figure(s) ({', '.join(proposed)}); "
            f"the stored gates were used, `{UPDATE_HINT}` adopts the code's"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--baselines", default=str(BASELINES), help="baseline JSON (values and gates) to gate against"
    )
    p.add_argument(
        "--update", action="store_true", help="rewrite the baselines and their gates with this run's figures"
    )
    p.add_argument("--only", action="append", choices=GROUPS, help="run only these groups (repeatable)")
    p.add_argument("--report", default=str(RESULTS / "bench-report.json"), help="JSON report path")
    p.add_argument("--threads", type=int, default=2, help="torch threads for timings")
    p.add_argument(
        "--latency",
        default=DEFAULT_MODELLED,
        help="the roofline group's device: modelled:<device>[:<precision>] (python -m harness.roofline catalogue)",
    )
    add_device_arguments(p, latency=True, text=False)
    args = p.parse_args(argv)
    from harness.roofline.metric import is_modelled, parse_modelled

    # parse_modelled names an unknown device or precision in one line, before minutes of work
    if not is_modelled(args.latency) or parse_modelled(args.latency)[0] == "host":
        raise ValueError(
            f"--latency {args.latency}: the bench models a catalogued device, e.g. {DEFAULT_MODELLED}; "
            "the host's latency is the latency group's"
        )
    policy = policy_from_args(args)  # before minutes of work: --device cuda here fails at once
    policy.apply()
    groups = args.only or list(DEFAULT_GROUPS)
    if "instructions" in groups and shutil.which("valgrind") is None:
        raise FileNotFoundError("--only instructions needs valgrind (apt-get install -y valgrind)")
    if "quality" in groups and not (DEFAULT_BASE / "config.json").is_file():
        raise FileNotFoundError(f"the quality group needs the shipped supernet at {DEFAULT_BASE}")
    # Read the baselines before minutes of measuring: a missing or malformed file is an error (only
    # --update may start from nothing), never an empty set of gates that everything passes.
    path = Path(args.baselines)
    baselines = load_baselines(path, missing_ok=args.update)
    torch.set_num_threads(args.threads)
    figures: dict[str, Figure] = {}
    runners = {
        "counts": counts,
        "roofline": lambda: roofline(args.latency),
        "latency": lambda: latency(args.threads, policy=policy),
        "training": lambda: training(args.threads),  # the training step is timed on the CPU (fp32)
        "quality": lambda: quality(policy),
        "instructions": instructions,
    }
    busy = []
    for g in groups:
        try:
            figures.update(runners[g]())
        except MachineBusy as e:  # not a regression, but no figure either: the gate fails, saying why
            busy.append(f"{g}: {e}")
    if not policy.is_default:  # the stored gates are the CPU fp32 figures': another policy has its own
        tag = f"@{policy.device}:{policy.precision}" + (":compiled" if policy.compile else "")
        tag += ":cudagraphs" if policy.cuda_graphs else ""
        figures = {f"{name}{tag}" if name.split("/")[0] in ("latency", "quality") else name: figure
                   for name, figure in figures.items()}  # fmt: skip
    rows = compare(figures, baselines)
    if rows:
        _print_table(rows)
    failing = [r for r in rows if r["verdict"] in FAILING]
    report = {
        "device": device_description(policy.device),
        "policy": policy.provenance(),
        "threads": args.threads,
        "torch": torch.__version__,
        "baselines": str(path),
        "rows": rows,
        "regression": any(r["verdict"] == "REGRESSION" for r in rows),
    }
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1))
    if busy:
        print("\n".join(f"BUSY {b}" for b in busy), file=sys.stderr)
    if args.update:
        write_baselines(path, updated(baselines, figures))
        print(f"baselines updated ({len(figures)} figures and their gates): {path}")
        return
    if busy:
        sys.exit(3)
    if failing:
        for kind in FAILING:
            bad = [r["metric"] for r in failing if r["verdict"] == kind]
            if bad:
                print(f"{kind} in {len(bad)} figure(s): {', '.join(bad)}", file=sys.stderr)
        if any(r["verdict"] == "NO BASELINE" for r in failing):
            print(
                f"figures without a stored gate are recorded by `{UPDATE_HINT} --only GROUP`", file=sys.stderr
            )
        sys.exit(1)
    print(f"no regression ({len(rows)} figures); report at {args.report}")


if __name__ == "__main__":
    run_cli(main)
