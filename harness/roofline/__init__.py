"""A roofline latency model of named GPUs (and of the host CPU, to validate it): per op of the meta-device
cost trace ``max(FLOPs / (peak x compute eff), bytes / (bandwidth x memory eff)) + overhead``, summed over a
generation as measured latency is; a catalogue of devices with sourced figures; fitting and calibration.

    python -m harness.roofline catalogue
    python -m harness.roofline table --device a100-sxm4-80gb
    python -m harness.roofline validate --out results/roofline/host-validation.json
    python -m harness.roofline calibrate --device cuda --target a100-sxm4-80gb --checkpoint DIR
"""

from harness.roofline.catalogue import (
    CATALOGUE,
    DEFAULT_EFFICIENCIES,
    PRECISIONS,
    DeviceSpec,
    Figure,
    compute_unit,
    get_device,
)
from harness.roofline.fit import fit_efficiencies, fit_overheads, load_model, save_calibration
from harness.roofline.model import (
    MODEL_VERSION,
    ModelledLatency,
    OpArrays,
    RooflineModel,
    denoiser_ops,
    modelled_generation,
    module_ops,
)

__all__ = [
    "CATALOGUE",
    "DEFAULT_EFFICIENCIES",
    "MODEL_VERSION",
    "PRECISIONS",
    "DeviceSpec",
    "Figure",
    "ModelledLatency",
    "OpArrays",
    "RooflineModel",
    "compute_unit",
    "denoiser_ops",
    "fit_efficiencies",
    "fit_overheads",
    "get_device",
    "load_model",
    "modelled_generation",
    "module_ops",
    "save_calibration",
]
