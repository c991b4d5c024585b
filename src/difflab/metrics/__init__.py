"""Sample-quality metrics on torchmetrics: FID / KID / IS with a named feature network, real-statistics cache."""

from difflab.metrics.feature_nets import FEATURE_NETS, FeatureNetUnavailable, load_classifier, make_metric
from difflab.metrics.generative import GenerativeMetrics
from difflab.metrics.straightness import straightness, trajectory_straightness

__all__ = [
    "FEATURE_NETS",
    "FeatureNetUnavailable",
    "GenerativeMetrics",
    "load_classifier",
    "make_metric",
    "straightness",
    "trajectory_straightness",
]
