"""How unlike the training images a patch is: Mahalanobis distance of its pooled backbone
features to the training features' mean and (shrunk) covariance.

When the top stages of the backbone are fine-tuned on cached activations, the
statistics are of the frozen stages' output (global-average pooled) instead: features
trained to tell cracks apart forget what is not concrete (leaf-like noise and a sky
gradient scored 0.76 and 0.71 in 99th-percentile units, like concrete, on the
fine-tuned features; 2.1 and 3.0 on the frozen stages'). The last pooled features of a
frozen backbone tell sky from concrete badly too, so a backbone frozen throughout is
described below its top stages as well (training/feature_stats.py,
docs/generalization.md).

The training callback `FeatureStatistics` (training/feature_stats.py) stores the
statistics in the checkpoint (checkpoint["feature_stats"]); scan scores a patch as its
distance divided by the median distance of unseen training-like images (cross-fitted).
The median, not a high percentile: the tail of the training distances grows with how
varied the training sources are (METU alone: 99th percentile 1.5x the median; METU,
SDNET decks and brickwork: 2.1x; with masked-photo tiles: 2.4x), so a tail-scaled score
put concrete from another camera far out after METU-only training and vegetation close in
after varied training. In median units both stay where they are whatever the sources
(docs/generalization.md, "Unfamiliar patches"): concrete of other cameras at most 3.4,
sky, leaves, text and objects from 3.9 up (scan.unfamiliar_limit: 3.5).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

CHECKPOINT_KEY = "feature_stats"
# covariance shrinkage towards its mean variance: keeps the inverse stable with few images
SHRINKAGE = 0.1
REFERENCE_QUANTILE = 0.5
# checkpoints without a "quantile": their "reference" is the 99th percentile, which on
# the METU, SDNET2018 deck sample and brickwork sets is 2.13x the median
OLD_REFERENCE_PER_MEDIAN = 2.13


def _moments(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and inverse shrunk covariance of (N, D) features."""
    features = features.double()
    mean = features.mean(0)
    centred = features - mean
    cov = centred.T @ centred / max(1, len(features) - 1)
    scale = torch.diagonal(cov).mean()
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * scale * torch.eye(len(mean), dtype=cov.dtype)
    return {"mean": mean.float(), "precision": torch.linalg.inv(cov).float()}


def fit_statistics(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, inverse shrunk covariance and the reference distance of (N, D) features.

    The reference is cross-fitted (statistics of one half, distances of the other), so
    it is what an unseen image of the training kind scores, not the smaller distance of
    an image the statistics were fitted on.
    """
    features = features.float()
    first, second = features[::2], features[1::2]
    held_out = torch.cat(
        [mahalanobis(second, _moments(first)), mahalanobis(first, _moments(second))]
    )
    reference = torch.quantile(held_out, REFERENCE_QUANTILE)
    quantile = torch.tensor([REFERENCE_QUANTILE])
    return _moments(features) | {"reference": reference.reshape(1), "quantile": quantile}


def mahalanobis(features: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    centred = features.float() - stats["mean"].to(features.device)
    precision = stats["precision"].to(features.device)
    return ((centred @ precision) * centred).sum(-1).clamp_min(0).sqrt()


def stats_stage(stats: Mapping[str, torch.Tensor]) -> int | None:
    """The backbone stage whose pooled output the statistics describe (None: the pooled
    features the head sees)."""
    return int(stats["stage"]) if "stage" in stats else None


def unfamiliar_score(features: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Distance in units of the median distance of unseen training-like images (1: as
    typical as they are). Statistics with a 99th-percentile reference (no "quantile") are
    put in the same units with the ratio measured on the sources they were trained on."""
    reference = stats["reference"].to(features.device)
    if "quantile" not in stats:
        reference = reference / OLD_REFERENCE_PER_MEDIAN
    return mahalanobis(features, stats) / reference
