"""Quality and cost metrics: Frechet / kernel distances (FVD, KVD) over feature sets, the FVD protocol
and its offline feature extractor ``proxy-v1``; FLOPs (fvcore), measured latency and a latency predictor."""

from harness.metrics.extractor import (
    DEFAULT_EXTRACTOR_DIR,
    PROXY_NAME,
    ProxyExtractor,
    load_extractor,
)
from harness.metrics.flops import (
    GenerationStage,
    count_flops,
    denoiser_flops,
    denoiser_inputs,
    flop_analysis,
    flops_by_operator,
    generation_flops,
    matmul_flops,
)
from harness.metrics.frechet import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_distance,
)
from harness.metrics.fvd import (
    FeatureExtractor,
    FVDProtocol,
    FVDResult,
    I3DFeatures,
    ProxyFeatures,
    evaluate_fvd,
    real_features,
    resolve_extractor,
    text_alignment,
    text_alignment_by_attribute,
)
from harness.metrics.latency import LatencyResult, device_description, measure_latency
from harness.metrics.latency_predictor import LatencyPredictor, calibration_report, subnet_features
from harness.metrics.motion import motion_alignment, object_centroids

__all__ = [
    "DEFAULT_EXTRACTOR_DIR",
    "PROXY_NAME",
    "FVDProtocol",
    "FVDResult",
    "FeatureExtractor",
    "GenerationStage",
    "I3DFeatures",
    "LatencyPredictor",
    "LatencyResult",
    "ProxyExtractor",
    "ProxyFeatures",
    "calibration_report",
    "count_flops",
    "denoiser_flops",
    "denoiser_inputs",
    "device_description",
    "evaluate_fvd",
    "feature_stats",
    "flop_analysis",
    "flops_by_operator",
    "frechet_distance",
    "frechet_distance_from_stats",
    "generation_flops",
    "kernel_distance",
    "load_extractor",
    "matmul_flops",
    "measure_latency",
    "motion_alignment",
    "object_centroids",
    "real_features",
    "resolve_extractor",
    "subnet_features",
    "text_alignment",
    "text_alignment_by_attribute",
]
