"""Named devices: peak dense throughput per precision, memory bandwidth and per-op overhead, each figure
with its public source beside it; and the default efficiencies per op kind, with where they come from.

Peaks are *dense* (NVIDIA's datasheets print tensor-core figures "with sparsity", twice the dense ones;
the dense figure is half the printed one, and the datasheets' footnotes say so). They are FLOP/s with 2
FLOPs per multiply-add, as the datasheets count. A device's ``peak_tflops`` maps a *unit* to its figure:

- ``fp32``: the CUDA cores' FP32 (non-tensor) throughput;
- ``tf32``: the tensor cores' TF32 throughput;
- ``bf16``: the tensor cores' BF16 / FP16 throughput (FP32 accumulate).

Which unit an op runs on depends on the precision of the run (:func:`compute_unit`): PyTorch runs fp32
convolutions on TF32 tensor cores by default (``torch.backends.cudnn.allow_tf32 = True``) but fp32
matmuls on the CUDA cores (``torch.backends.cuda.matmul.allow_tf32 = False`` since 1.12; PyTorch docs,
"TensorFloat-32 (TF32) on Ampere (and later) devices"); ``tf32`` turns both on; ``bf16`` runs every
matmul-like op on the BF16 tensor cores. Attention in fp32 / tf32 runs the memory-efficient kernel on the
CUDA cores (FlashAttention needs fp16 / bf16; PyTorch docs, ``torch.nn.functional.scaled_dot_product_attention``).
Everything else (norms, elementwise, copies) is memory-bound and counted at the fp32 CUDA-core peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("fp32", "tf32", "bf16")
MATMUL_KINDS = ("conv", "conv_1d", "pointwise", "linear", "attention")
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2}  # bytes per element moved (tf32 is stored as fp32)


@dataclass(frozen=True)
class Figure:
    """One number and where it comes from (a datasheet, a paper, a measurement)."""

    value: float
    source: str


@dataclass(frozen=True)
class DeviceSpec:
    """A device for the roofline model. ``peak_tflops``: unit -> dense TFLOP/s (see the module doc);
    ``bandwidth_gbs``: memory bandwidth (GB/s, 1e9 bytes); ``launch_us``: overhead per op that launches
    work (a kernel launch plus PyTorch's dispatch); ``view_us``: overhead per view / reshape call (no
    kernel on a GPU: its host time overlaps the queued kernels; on a CPU it is on the critical path)."""

    key: str  # what --latency modelled:<key> names
    name: str  # the device name values are stored under (with the model version)
    peak_tflops: dict[str, Figure]
    bandwidth_gbs: Figure
    launch_us: Figure
    view_us: Figure = field(default_factory=lambda: Figure(0.0, "no kernel: overlaps queued GPU work"))
    cuda_names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name that identify it

    def figures(self) -> dict[str, Figure]:
        """Every figure by name (for reports, identities and the sources test)."""
        out = {f"peak_{unit}_tflops": fig for unit, fig in self.peak_tflops.items()}
        out.update(bandwidth_gbs=self.bandwidth_gbs, launch_us=self.launch_us, view_us=self.view_us)
        return out

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "name": self.name,
            **{k: {"value": f.value, "source": f.source} for k, f in self.figures().items()},
        }


_A100_SHEET = "NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)"
_H100_SHEET = "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column)"
_H200_SHEET = "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column)"
_L4_SHEET = "NVIDIA L4 Tensor Core GPU datasheet"
_DENSE = "; dense = half the printed with-sparsity figure"
# A short kernel costs a few microseconds to launch (NVIDIA Technical Blog, "Getting Started with CUDA
# Graphs", 2019: ~3.8 us per back-to-back short kernel including its ~2.9 us run; 4-6 us per launch
# measured in the pegainfer CUDA-graph notes, 2025); eager PyTorch adds its dispatcher on the host. 5 us
# per op is an estimate to be replaced by `python -m harness.roofline calibrate` on the device.
_LAUNCH = Figure(
    5.0,
    "estimate: CUDA launch ~3-6 us (NVIDIA blog 'Getting Started with CUDA Graphs'; pegainfer notes) "
    "+ PyTorch eager dispatch; calibrate on the device",
)


def _gpu(key, name, fp32, tf32, bf16, bandwidth, sheet, cuda_names, bw_note="") -> DeviceSpec:
    return DeviceSpec(
        key=key,
        name=name,
        peak_tflops={
            "fp32": Figure(fp32, f"{sheet}: FP32 {fp32:g} TFLOPS"),
            "tf32": Figure(tf32, f"{sheet}: TF32 Tensor Core {2 * tf32:g} TFLOPS with sparsity{_DENSE}"),
            "bf16": Figure(bf16, f"{sheet}: BF16 Tensor Core {2 * bf16:g} TFLOPS with sparsity{_DENSE}"),
        },
        bandwidth_gbs=Figure(bandwidth, f"{sheet}: GPU memory bandwidth {bandwidth:g} GB/s{bw_note}"),
        launch_us=_LAUNCH,
        cuda_names=cuda_names,
    )


CATALOGUE: dict[str, DeviceSpec] = {
    d.key: d
    for d in (
        _gpu("a100-sxm4-80gb", "A100-SXM4-80GB", 19.5, 156, 312, 2039, _A100_SHEET, ("A100", "80GB")),
        _gpu("a100-pcie-40gb", "A100-PCIe-40GB", 19.5, 156, 312, 1555, _A100_SHEET, ("A100", "PCIE", "40GB")),
        _gpu("h100-sxm", "H100-SXM5-80GB", 67, 494.5, 989.5, 3350, _H100_SHEET, ("H100", "HBM3")),
        _gpu("h200", "H200-SXM-141GB", 67, 494.5, 989.5, 4800, _H200_SHEET, ("H200",)),
        _gpu("l4", "L4", 30.3, 60, 121, 300, _L4_SHEET, ("L4",)),
    )
}


# Default efficiencies per op kind: (fraction of the unit's peak, fraction of the memory bandwidth).
# Sources: large GEMMs reach 80-90 % of an A100's tensor peak and FlashAttention-2's forward 50-73 % (Dao,
# "FlashAttention-2", 2023, sections 1 and 4.1); a UNet's GEMMs are mid-sized (a few thousand rows,
# 320-1280 columns), so 0.7; cuDNN's implicit-GEMM convolutions below that, 0.6 (an assumption), and the
# temporal 3x1x1 / 1x1 kernels, with little reuse per byte, 0.5; attention with an additive mask (our
# temporal attention) cannot use the flash kernel, so 0.4 of the unit's peak. Streaming kernels reach
# ~88-90 % of an A100's DRAM bandwidth (NVIDIA Developer Forums, "Trouble to reach peak bandwidth of
# A100", 2025: 1.80 of 2.04 TB/s, and the GTC talk cited there: ~90 % at best); PyTorch's elementwise
# and norm kernels on strided video tensors less, 0.7 (an assumption). Calibration replaces them all.
DEFAULT_EFFICIENCIES: dict[str, tuple[float, float]] = {
    "conv": (0.6, 0.7),
    "conv_1d": (0.5, 0.7),
    "pointwise": (0.5, 0.7),
    "linear": (0.7, 0.7),
    "attention": (0.4, 0.7),
    "norm": (1.0, 0.7),
    "elementwise": (1.0, 0.7),
    "copy": (1.0, 0.7),
}
EFFICIENCY_SOURCE = (
    "defaults of harness.roofline.catalogue.DEFAULT_EFFICIENCIES (FlashAttention-2 paper for GEMM and "
    "attention; NVIDIA forums / GTC for streaming bandwidth; the rest assumptions) - uncalibrated"
)


def compute_unit(kind: str, precision: str) -> str:
    """The peak an op of ``kind`` runs at under ``precision`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if kind not in MATMUL_KINDS:
        return "fp32"
    if precision == "bf16":
        return "bf16"
    if kind == "attention":
        return "fp32"
    if precision == "tf32" or kind in ("conv", "conv_1d", "pointwise"):
        return "tf32"  # cuDNN's allow_tf32 is on by default; matmul's only under tf32
    return "fp32"


def get_device(key: str) -> DeviceSpec:
    """The catalogue entry ``key`` (case-insensitive); one line naming the choices otherwise."""
    spec = CATALOGUE.get(key.strip().lower())
    if spec is None:
        raise ValueError(f"unknown device {key!r} for a modelled latency; use one of {', '.join(CATALOGUE)}")
    return spec
