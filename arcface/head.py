"""ArcFace head: additive angular margin on normalised class weights, with sub-centers.

ArcFace (Deng et al., 2019) replaces a classifier's logits by `s * cos(theta)`, where theta is
the angle between the L2-normalised feature and the L2-normalised class weight, and adds a
margin m to the angle of each sample's own class during training: `s * cos(theta_y + m)`.
Cross-entropy of these logits is the ArcFace loss. Sub-center ArcFace (Deng et al., 2020) gives
each class k weight vectors and uses the closest one, so noisy samples can gather on a
non-dominant sub-center instead of pulling the class center away.

Weight layout: `weight` is (num_classes * sub_centers, in_features) and row `c * k + j` is
sub-center j of class c. This is exactly mmpretrain's `ArcFaceClsHead.norm_product.weight`
(copy as is). pytorch-metric-learning's `ArcFaceLoss` / `SubCenterArcFaceLoss` keep
`W` as (in_features, num_classes * k) with the same column order, so `weight = W.T`
(and their margin is in degrees: `m_rad = math.radians(margin)`). PML applies
`cos(theta + m)` everywhere, without the large-angle fallback used here and in mmpretrain,
so the two agree wherever `theta + m < pi`.
"""

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from arcface.textfile import DataError, read_text

# Lower bound for 1 - cos^2 under the square root: sqrt has an infinite slope at 0, which would
# turn exact cos = +-1 (a feature parallel to a weight row) into NaN gradients. At 1e-12 the
# value error is sqrt(1e-12) * sin(m) < 1e-6, far below float32 logit noise at s = 64.
_SIN_SQUARED_MIN = 1e-12


class ArcFaceHead(nn.Module):
    """Cosine classifier with an additive angular margin on the target class.

    `forward(features)` returns `scale * cos` (N, num_classes); `forward(features, labels)`
    replaces each sample's target cosine by its margin version, so that
    `F.cross_entropy(head(features, labels), labels)` is the ArcFace loss.

    `margin` is one float (radians) for all classes, a sequence with one float per class, or the
    path of a text file with one float per line (line i is class i). Margins are configuration,
    not learned state, so they are a non-persistent buffer (as in mmpretrain): they follow
    `.to(device)` but stay out of the state dict.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float | Sequence[float] | str | os.PathLike = 0.5,
        sub_centers: int = 1,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        check_head_args("ArcFaceHead", in_features, num_classes, sub_centers, scale)
        self.in_features = in_features
        self.num_classes = num_classes
        self.sub_centers = sub_centers
        self.scale = float(scale)
        self.easy_margin = easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, in_features))
        # Rows are normalised in forward, so only their directions matter: any isotropic init
        # gives uniformly random directions.
        nn.init.normal_(self.weight, std=0.01)
        self.register_buffer("margin", load_margins(margin, num_classes), persistent=False)

    def extra_repr(self) -> str:
        margins = self.margin
        if bool((margins == margins[0]).all()):
            margin = f"{margins[0].item():.4g}"
        else:
            margin = f"per-class [{margins.min().item():.4g}, {margins.max().item():.4g}]"
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"scale={self.scale:g}, margin={margin}, sub_centers={self.sub_centers}, "
            f"easy_margin={self.easy_margin}"
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, in_features) features [, (N,) int64 labels] -> (N, num_classes) float32 logits."""
        # The margin math runs in float32 even under autocast: in bfloat16, cos near 1 has a
        # resolution of ~0.004, i.e. angles below ~5 degrees are indistinguishable.
        with torch.autocast(device_type=features.device.type, enabled=False):
            cos = self.cosine(features)  # (N, C)
            if labels is None:
                return self.scale * cos
            if labels.shape != cos.shape[:1]:
                raise ValueError(
                    f"ArcFaceHead: labels must have shape ({cos.shape[0]},) to match the "
                    f"features, got {tuple(labels.shape)}"
                )
            labels = labels.long()[:, None]  # (N, 1)
            target_cos = cos.gather(1, labels)  # (N, 1)
            target_margin = self.margin[labels]  # (N, 1)
            target_logit = self._add_margin(target_cos, target_margin)  # (N, 1)
            return self.scale * cos.scatter(1, labels, target_logit)  # (N, C)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The batch's ArcFace loss: cross-entropy of the margin logits. `step` is for heads that
        sample classes per optimizer step (PartialFCHead); this one scores every class."""
        return F.cross_entropy(self(features, labels), labels)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(N, in_features) -> (N, num_classes): cosine to each class's closest sub-center."""
        subcenter_cos = self._subcenter_cosine(features)  # (N, C, k)
        return subcenter_cos.amax(dim=2)  # (N, C)

    def _subcenter_cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(N, in_features) -> (N, C, k) cosines to every sub-center, in float32."""
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"ArcFaceHead: features must have shape (N, {self.in_features}), "
                f"got {tuple(features.shape)}"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), dim=1)  # (N, D)
            w = F.normalize(self.weight.float(), dim=1)  # (C*k, D)
            # Rounding can push |cos| a few ulp past 1; acos-based formulas would give NaN.
            cos = (x @ w.T).clamp(-1.0, 1.0)  # (N, C*k)
        return cos.view(len(x), self.num_classes, self.sub_centers)  # (N, C, k)

    def _add_margin(self, cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """cos(theta) -> cos(theta + m) elementwise, with the large-angle fallback."""
        # cos(theta + m) = cos*cos(m) - sin*sin(m), written without acos: d/dx acos(x) is
        # infinite at x = +-1, while this form has finite gradients everywhere.
        sin = (1.0 - cos * cos).clamp(min=_SIN_SQUARED_MIN).sqrt()
        phi = cos * torch.cos(m) - sin * torch.sin(m)
        if self.easy_margin:
            return torch.where(cos > 0, phi, cos)
        # Past theta = pi - m, cos(theta + m) would rise again (theta + m > pi) and reward a
        # worse angle; the reference fallback cos - m*sin(m) stays decreasing in theta.
        return torch.where(cos > torch.cos(math.pi - m), phi, cos - m * torch.sin(m))


def check_head_args(owner: str, in_features: int, num_classes: int, sub_centers: int, scale: float) -> None:
    """ValueError naming `owner` and the argument unless the sizes are positive integers and the
    scale a positive number (the dense head and its Partial FC shards take the same arguments)."""
    for name, value in (("in_features", in_features), ("num_classes", num_classes), ("sub_centers", sub_centers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{owner}: scale must be a positive number, got {scale!r}")


def load_margins(
    margin: float | Sequence[float] | str | os.PathLike, num_classes: int
) -> torch.Tensor:
    """A float, per-class sequence, or margin file -> (num_classes,) float32 margins in radians."""
    if isinstance(margin, (str, os.PathLike)):
        values = _read_margin_file(margin, num_classes)
        where = [f"{os.fspath(margin)}:{line}" for line in range(1, len(values) + 1)]
    elif isinstance(margin, (int, float)) and not isinstance(margin, bool):
        values = [float(margin)] * num_classes
        where = ["margin"] * num_classes
    else:
        values = [float(value) for value in margin]
        if len(values) != num_classes:
            raise ValueError(
                f"ArcFaceHead: got {len(values)} per-class margins, expected {num_classes} "
                "(one per class)"
            )
        where = [f"margin[{index}]" for index in range(num_classes)]
    for value, place in zip(values, where):
        check_margin(value, place)
    return torch.tensor(values, dtype=torch.float32)


def check_margin(value: float, where: str) -> None:
    """Raises DataError (a ValueError) naming `where` unless 0 <= value < pi (radians; NaN fails too).

    From pi on, theta + m passes pi for every theta > 0, where cos(theta + m) rises again: the
    margin would reward the target class instead of penalising it.
    """
    if not (0.0 <= value < math.pi):
        raise DataError(f"{where}: margin must be in [0, pi) radians, got {value!r}")


def _read_margin_file(path: str | os.PathLike, num_classes: int) -> list[float]:
    """One float per line, line i for class i-1; blank lines are not allowed in between."""
    lines = read_text(path).split("\n")  # newlines only, so line numbers are an editor's
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline or two is not a missing class
    values = []
    for line_number, line in enumerate(lines, start=1):
        try:
            values.append(float(line.strip()))
        except ValueError:
            raise DataError(
                f"{os.fspath(path)}:{line_number}: expected one margin (a float, radians) "
                f"per line, got {line!r}"
            ) from None
    if len(values) != num_classes:
        raise DataError(
            f"{os.fspath(path)}: has {len(values)} margins, expected {num_classes} "
            "(one line per class)"
        )
    return values
