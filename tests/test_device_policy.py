"""One device and precision policy end to end (issue 18): the device audit, precisions, the cache key,
the synchronised device, the missing-GPU line, torch.compile.

The audit: every call runs with ``torch.device("meta")`` as the default device while the policy asks for
``cpu``. A tensor our code creates without ``device=`` lands on meta and fails when it meets a CPU
tensor (meta and CPU never mix, not even 0-dim), so a stray default is caught. Library code that
builds tensors from the default device (diffusers' schedulers, tokenizers, module constructors, the data
pipeline) runs under an explicit ``harness.device_policy.default_device`` chosen by our code; those pins
are the documented exceptions (the scheduler's tables and the real clips are CPU tensors by design).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.candidates import Candidate
from harness.device_policy import DevicePolicy, check_device, deployed, synchronize
from harness.measurement import Generation, MeasureSettings
from harness.measurement.cost import Latency
from harness.measurement.quality import FrechetQuality
from harness.measurement.recorder import cache_key, full_identity
from harness.metrics.latency import measure_latency
from harness.models import in_memory, load_bundle
from harness.paths import DEFAULT_BASE
from harness.pipeline import Chain, generate, video_seeds
from search_spaces import build_supernet

from .conftest import randomize_

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a large red square moving left", "a small blue circle moving up"]
NO_GPU = torch.cuda.device_count() == 0
# Loose acceptance limits: these tests check where tensors live, not the machine's quiet.
QUICK = {"min_run_time": 0.04, "latency_rounds": 2, "latency_max_spread": 100.0,
         "latency_probe_tolerance": 100.0, "latency_other_cpu": 100.0, "latency_retries": 6, "latency_backoff_s": 0.05}  # fmt: skip


@pytest.fixture(scope="module")
def base():
    bundle = load_bundle(DEFAULT_BASE)
    return bundle, bundle.text_encoder.load("cpu")


# -- the device audit ------------------------------------------------------------------------------------
def test_generation_creates_nothing_off_the_requested_device(base) -> None:
    """A text-conditioned generation with guidance, and a base + SSR chain (noise augmentation, the
    level tensor), under a meta default device: the same videos as under the CPU default."""
    bundle, text = base
    chain = Chain(bundle, None, text, bundle.network.space.smallest(), policy=DevicePolicy("cpu"))
    expected = generate(chain, PROMPTS, steps=2, video_seeds=video_seeds(0, 0, 2))
    with torch.device("meta"):
        video = generate(chain, PROMPTS, steps=2, video_seeds=video_seeds(0, 0, 2))
        shared = generate(chain, PROMPTS, steps=2, seed=3)  # one generator for the batch
    assert video.device.type == "cpu" and shared.device.type == "cpu"
    torch.testing.assert_close(video, expected, rtol=0, atol=0)

    ssr = in_memory(randomize_(build_supernet("pixel-ssr", "tiny"), seed=5))
    base_net = in_memory(randomize_(build_supernet("pixel-base", "tiny"), seed=4))
    res = base_net.network.space.default_resolution * 2
    if res not in ssr.network.space.resolutions:
        pytest.skip(f"the tiny SSR preset has no {res}px stage")
    chain = Chain(base_net, ssr, None, policy=DevicePolicy("cpu"))
    expected = generate(chain, ["", ""], res, steps=1, guidance=1.0, video_seeds=video_seeds(1, 0, 2))
    with torch.device("meta"):
        video = generate(chain, ["", ""], res, steps=1, guidance=1.0, video_seeds=video_seeds(1, 0, 2))
    assert video.shape[-1] == res and video.device.type == "cpu"
    torch.testing.assert_close(video, expected, rtol=0, atol=0)


def test_fvd_computation_creates_nothing_off_the_requested_device(base, tmp_path) -> None:
    """Generation, the text encoder, the proxy extractor, real features, floor and statistics."""
    bundle, _ = base
    text = bundle.text_encoder.load("cpu")  # a fresh cache: the encoder's forward runs in the audit
    settings = MeasureSettings(steps=2, fvd_videos=3, real_videos=8, device="cpu")
    quality = FrechetQuality(Generation(bundle, None, 2, 3.0), text, settings, cache_dir=tmp_path)
    cand = Candidate(bundle.network.space.smallest())
    with torch.device("meta"):
        values, extra = quality.compute(cand)
    assert all(torch.isfinite(torch.tensor(values[m], device="cpu")) for m in ("fvd", "kvd"))
    assert extra["policy"]["device"] == "cpu" and extra["policy"]["precision"] == "fp32"


def test_latency_creates_nothing_off_the_requested_device(base) -> None:
    bundle, _ = base
    settings = MeasureSettings(steps=2, **QUICK)
    latency = Latency.from_settings(Generation(bundle, None, 2, 3.0, settings.policy), settings)
    cand = Candidate(bundle.network.space.smallest())
    with torch.device("meta"):
        values, extra = latency.compute(cand)
    assert values["latency_ms"] > 0
    assert extra["policy"]["device"] == "cpu" and "synchronised" in extra["timed"]


def test_latent_family_generates_and_times_its_decoder_where_asked() -> None:
    """A latent model: generation decodes with the bundle's autoencoder, and the latency's
    once-per-video decoder is that same module, timed where it is, never moved (moving it in place was
    the latent-family ``--device cuda`` failure: CPU latents met CUDA weights in the next generation)."""
    from harness.autoencoder import build_autoencoder
    from harness.latent import LatentCodec
    from harness.measurement.cost import _on_device

    codec = LatentCodec(randomize_(build_autoencoder("tiny"), seed=3, scale=0.2), 1.0)
    net = randomize_(build_supernet("latent-unet", "tiny"), seed=5).eval()
    bundle = in_memory(net, codec=codec)
    cfg = net.space.smallest(8)
    settings = MeasureSettings(steps=1, **QUICK)
    chain = Chain(bundle, base_subnet=cfg, policy=settings.policy)
    expected = generate(chain, [""], steps=1, seed=0)
    generation = Generation(bundle, None, 1, 3.0, settings.policy)
    latency = Latency.from_settings(generation, settings)
    with torch.device("meta"):
        video = generate(chain, [""], steps=1, seed=0)
        values, extra = latency.compute(Candidate(cfg))
    torch.testing.assert_close(video, expected, rtol=0, atol=0)
    assert [s["stage"] for s in extra["stages"]][-1] == "decode" and values["latency_ms"] > 0
    decoder = generation.once_per_video(Candidate(cfg))[0].module
    assert _on_device(decoder, "cpu") is decoder and decoder.autoencoder is codec.autoencoder


# -- precision -------------------------------------------------------------------------------------------
def test_bf16_autocast_generation_is_float32_on_the_device_and_close(base) -> None:
    bundle, text = base
    cfg = bundle.network.space.smallest()
    seeds = video_seeds(0, 0, 2)
    fp32 = generate(Chain(bundle, None, text, cfg, policy=DevicePolicy("cpu")), PROMPTS, steps=2,
                    video_seeds=seeds)  # fmt: skip
    bf16 = generate(Chain(bundle, None, text, cfg, policy=DevicePolicy("cpu", "bf16-autocast")), PROMPTS,
                    steps=2, video_seeds=seeds)  # fmt: skip
    assert bf16.dtype == torch.float32 and bf16.device.type == "cpu"
    assert not torch.equal(fp32, bf16)  # the precision really applied
    assert float((fp32 - bf16).abs().mean()) < 0.05  # ... and only rounded


def test_default_policy_keeps_every_existing_key_and_others_change_it(base) -> None:
    """fp32 on the CPU adds nothing to protocols or identities (rows recorded before precisions keep
    their cache keys; the strings below are what the code before issue 18 produced); any other
    precision, compile or device names itself in both."""
    bundle, _ = base
    cand = Candidate(bundle.network.space.largest())

    def groups(**kw):
        s = MeasureSettings(**kw)
        g = Generation(bundle, None, s.steps, s.guidance, s.policy)
        return Latency.from_settings(g, s), FrechetQuality(g, None, s)

    latency, quality = groups()
    assert (
        latency.protocol(cand) == "gen:ddim8:cfg:16px:12f:b1:threads2:measured-static:float32:median7x120ms"
    )
    assert quality.protocol(cand) == "fvd32_12f_16px@proxy-v1:real256:x1:ddim8:g3:q2-crn-bal-u8-jk:seed0"
    assert set(latency.identity(cand)) == {"versions"}
    assert set(quality.identity(cand)) == {"versions", "extractor_sha256"}

    bf_latency, bf_quality = groups(precision="bf16-autocast")
    assert "measured-static:bf16-autocast:" in bf_latency.protocol(cand)
    assert bf_quality.protocol(cand).endswith(":seed0:bf16-autocast")
    for old, new in ((latency, bf_latency), (quality, bf_quality)):
        assert new.identity(cand)["precision"] == "bf16-autocast"
        assert cache_key(full_identity(old.identity(cand))) != cache_key(full_identity(new.identity(cand)))
    compiled, _ = groups(compile=True)
    assert ":compiled:" in compiled.protocol(cand)


def test_policy_sets_and_records_float32_numerics() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True  # what a library may have left behind
    torch.set_float32_matmul_precision("high")
    try:
        policy = DevicePolicy("cpu")
        numerics = policy.apply()
        assert numerics == {"matmul_precision": "highest", "cuda_matmul_tf32": False, "cudnn_tf32": False}
        prov = policy.provenance()
        assert prov["torch"] == torch.__version__ and prov["cuda"] == torch.version.cuda
        assert prov["precision"] == "fp32" and prov["matmul_precision"] == "highest"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_bad_precision_and_cpu_cuda_graphs_are_one_line() -> None:
    with pytest.raises(ValueError, match="unknown --precision 'fp8'") as error:
        MeasureSettings(precision="fp8")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
        DevicePolicy("cpu", cuda_graphs=True)


# -- devices ---------------------------------------------------------------------------------------------
def test_synchronize_waits_for_the_named_device_not_the_current_one(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(device))
    synchronize("cuda:1")
    synchronize("cpu")  # nothing to wait for
    assert seen == [torch.device("cuda:1")]


@pytest.mark.skipif(not NO_GPU, reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize(
    "module, argv",
    [
        ("harness.evaluate", ["--device", "cuda"]),
        ("harness.search", ["--device", "cuda", "--trials", "1"]),
        ("harness.sample", ["--device", "cuda", "--prompt", "x"]),
        ("harness.bench", ["--device", "cuda", "--only", "counts"]),
        ("harness.predictor", ["--device", "cuda"]),
    ],
)
def test_cuda_without_a_gpu_is_one_line_and_exit_2(module, argv, capsys, tmp_path) -> None:
    """Before anything is loaded or written (search: no store file appears)."""
    import importlib

    from harness.cli import run_cli

    main = importlib.import_module(module).main
    if module == "harness.search":
        argv = [*argv, "--storage", f"sqlite:///{tmp_path}/h.db"]
    if module == "harness.predictor":
        assert main(argv) == 2
    else:
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda: main(argv))
        assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cuda is not available on this machine" in err
    assert not (tmp_path / "h.db").exists()


@pytest.mark.skipif(not NO_GPU, reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_from_the_command_line() -> None:
    run = subprocess.run([sys.executable, "-m", "harness.evaluate", "--device", "cuda"], cwd=REPO,
                         check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2
    message = (
        f"error: cuda is not available on this machine (torch {torch.__version__} sees no CUDA device); "
        "use --device cpu or run where a GPU is"
    )
    assert run.stderr.strip().splitlines() == [message]


def test_unknown_device_is_one_line() -> None:
    with pytest.raises(ValueError, match="unsupported --device 'mps'"):
        check_device("mps")


# -- deployed forwards -------------------------------------------------------------------------------------
def test_measure_latency_records_the_precision_it_timed() -> None:
    module = torch.nn.Linear(16, 16)
    inputs = {"input": torch.randn(4, 16)}
    result = measure_latency(module, inputs, min_run_time=0.02, policy=DevicePolicy("cpu", "bf16-autocast"))
    assert (result.precision, result.dtype, result.compiled) == ("bf16-autocast", "bf16-autocast", False)
    with torch.inference_mode():
        assert deployed(module, inputs, DevicePolicy("cpu", "bf16-autocast"))().dtype == torch.bfloat16


@pytest.mark.slow  # torch.compile builds C++ kernels: ~50 s on the 2-core machine
def test_compiled_forward_matches_eager_and_is_recorded(base) -> None:
    bundle, _ = base
    net = bundle.supernet
    static = net.extract(net.space.smallest()).eval()
    inputs = Generation(bundle, None, 2, 3.0).stage_inputs(static, 16, 2)
    with torch.inference_mode():
        eager = static(**inputs)
        compiled = deployed(static, inputs, DevicePolicy("cpu", compile=True))()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    result = measure_latency(static, inputs, min_run_time=0.02, warmup=1, policy=DevicePolicy(compile=True))
    assert result.compiled and result.median_ms > 0


def test_studies_created_before_precisions_resume_and_others_are_told_apart() -> None:
    from dataclasses import asdict

    from harness.measurement.settings import POLICY_FIELDS, study_settings
    from harness.searchers.runner import check_same_protocol

    before = {k: v for k, v in asdict(MeasureSettings()).items() if k not in POLICY_FIELDS}
    assert study_settings(MeasureSettings()) == before
    check_same_protocol("old", {"settings": before}, {"settings": study_settings(MeasureSettings())})
    with pytest.raises(ValueError, match="settings.precision=None"):
        check_same_protocol(
            "old",
            {"settings": before},
            {"settings": study_settings(MeasureSettings(precision="bf16-autocast"))},
        )


def test_latency_modes_take_registered_kinds_with_an_argument(monkeypatch) -> None:
    from harness.measurement import settings as settings_module

    with pytest.raises(ValueError, match="unknown latency mode 'future:h100'"):
        MeasureSettings(latency="future:h100")
    kinds = [*settings_module.LATENCY_MODE_KINDS, "future"]
    monkeypatch.setattr(settings_module, "LATENCY_MODE_KINDS", kinds)  # as a new mode registers
    assert MeasureSettings(latency="future:h100").latency == "future:h100"
    with pytest.raises(ValueError, match="future:<argument>"):
        MeasureSettings(latency="future:")


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device (the GPU check of issue 18)")
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_cuda_end_to_end_audit(base, tmp_path, precision) -> None:
    """On a GPU: generation, FVD (text encoder and extractor on the GPU) and latency, eager and replayed
    from CUDA graphs, with nothing created off the device; a latent model's decoder timed on the GPU
    and generation with the same codec afterwards (the in-place move of issue 18)."""
    from harness.autoencoder import build_autoencoder
    from harness.latent import LatentCodec

    bundle = load_bundle(DEFAULT_BASE)
    settings = MeasureSettings(
        steps=2, fvd_videos=3, real_videos=8, device="cuda", precision=precision, **QUICK
    )
    policy = settings.policy
    policy.apply()
    policy.place(bundle)
    text = bundle.text_encoder.load("cuda")
    cand = Candidate(bundle.network.space.smallest())
    generation = Generation(bundle, None, 2, 3.0, policy)
    with torch.device("meta"):
        video = generate(generation.chain(cand, text), PROMPTS, steps=2, video_seeds=video_seeds(0, 0, 2))
        values, extra = FrechetQuality(generation, text, settings, cache_dir=tmp_path).compute(cand)
        latency, timed = Latency.from_settings(generation, settings).compute(cand)
    assert video.device.type == "cuda" and values["fvd"] > 0 and latency["latency_ms"] > 0
    assert extra["policy"]["device"] == "cuda" and timed["policy"]["cuda"] == torch.version.cuda
    graphs = MeasureSettings(steps=2, device="cuda", precision=precision, cuda_graphs=True, **QUICK)
    assert Latency.from_settings(generation, graphs).compute(cand)[0]["latency_ms"] > 0

    codec = LatentCodec(randomize_(build_autoencoder("tiny"), seed=3, scale=0.2), 1.0)
    latent = in_memory(randomize_(build_supernet("latent-unet", "tiny"), seed=5).eval(), codec=codec)
    policy.place(latent)
    cfg = latent.network.space.smallest(8)
    g = Generation(latent, None, 1, 3.0, policy)
    Latency.from_settings(g, settings).compute(Candidate(cfg))
    assert generate(g.chain(Candidate(cfg), None), [""], steps=1).device.type == "cuda"
