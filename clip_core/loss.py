"""Contrastive losses: CLIP's symmetric cross-entropy and SigLIP's sigmoid loss.

CLIP (Radford et al. 2021), Section 2.3 and Figure 3: N image and N text features,
L2-normalised, give N x N scaled cosine similarities; the loss is the mean of the row-wise
and column-wise cross-entropies with the diagonal as the labels. Section 2.5: the
similarity matrix is sharded across workers, each scoring its own rows against all gathered
features (``local_loss``). SigLIP (Zhai et al. 2023, Section 3): a pairwise sigmoid loss,
+1 on the diagonal and -1 elsewhere, summed over columns and averaged over rows.

The loss is plain math; the cross-worker gather is a separate function passed in.

Gradients under data parallelism. Let J be the single-process loss on the whole batch and
each rank r compute L_r on its shard; DDP averages parameter gradients over W ranks.
- ``gather_with_grad=True``: J = mean_r L_r (``local_loss``) or J = L_r (full matrix), and
  the gather's backward sums what every rank's loss sends back to each shard, so rank r's
  feature gradient is W * dJ/d(its features) and the DDP-averaged parameter gradient is
  exactly dJ/dtheta.
- ``gather_with_grad=False``: the gathered copies carry no gradient; only the local
  features, put back into their own slot, do. With the full matrix the feature gradient is
  dJ/d(features) (not W times), so encoder gradients come out divided by W while
  ``logit_scale`` keeps its full gradient. With ``local_loss`` each rank sees only the
  gradient of its own n x N block, missing what other ranks' rows send to its features.
"""
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol

Gather = Callable[[torch.Tensor], torch.Tensor]


def gather_features(x: torch.Tensor, gather_with_grad: bool = True) -> torch.Tensor:
    """All-gather `x` along dim 0 over the default process group, keeping autograd if asked."""
    # the backward is a reduce-scatter with sum: each rank's slot gets every rank's gradient
    if not gather_with_grad:
        x = x.detach()
    return funcol.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)  # (W*n, D)


def _replace_slot(gathered: torch.Tensor, local: torch.Tensor, rank: int) -> torch.Tensor:
    """Put `local` (with its autograd history) back into its rows of a detached gather."""
    n = local.shape[0]
    return torch.cat([gathered[: rank * n], local, gathered[(rank + 1) * n :]])


def _symmetric_ce(logits_per_image, logits_per_text, labels) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies."""
    image_loss = F.cross_entropy(logits_per_image, labels)
    text_loss = F.cross_entropy(logits_per_text, labels)
    return (image_loss + text_loss) / 2


def clip_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Figure 3) for one batch of normalised features."""
    logits_per_image = logit_scale * image_features @ text_features.T  # (N, N)
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return _symmetric_ce(logits_per_image, logits_per_image.T, labels)


class ClipLoss(nn.Module):
    """CLIP loss over a batch sharded across `world_size` ranks (open_clip's options)."""

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        gather: Optional[Gather] = None,
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.gather = gather if gather is not None else gather_features

    def _all(self, x: torch.Tensor) -> torch.Tensor:
        """Gather `x` from every rank; without grad, the local slot keeps its history."""
        if self.gather_with_grad:
            return self.gather(x)
        return _replace_slot(self.gather(x.detach()), x, self.rank)

    def forward(self, image_features, text_features, logit_scale) -> torch.Tensor:
        if self.world_size == 1:
            return clip_loss(image_features, text_features, logit_scale)
        all_image, all_text = self._all(image_features), self._all(text_features)  # (W*n, D)
        if not self.local_loss:
            return clip_loss(all_image, all_text, logit_scale)
        n = image_features.shape[0]
        logits_per_image = logit_scale * image_features @ all_text.T  # (n, W*n)
        logits_per_text = logit_scale * text_features @ all_image.T  # (n, W*n)
        labels = torch.arange(n, device=image_features.device) + self.rank * n
        return _symmetric_ce(logits_per_image, logits_per_text, labels)


def _sigmoid_loss(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """-sum(logsigmoid(labels * logits)) / rows, labels +1 at (i, i + offset), -1 elsewhere."""
    n = logits.shape[0]
    labels = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n


def siglip_loss(image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss for one batch of normalised features."""
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (N, N)
    return _sigmoid_loss(logits)


class SigLipLoss(nn.Module):
    """SigLIP loss with local images against all-gathered texts (gradients through the gather)."""

    def __init__(self, rank: int = 0, world_size: int = 1, gather: Optional[Gather] = None):
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.gather = gather if gather is not None else gather_features

    def forward(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        if self.world_size == 1:
            return siglip_loss(image_features, text_features, logit_scale, logit_bias)
        all_text = self.gather(text_features)  # (W*n, D)
        logits = logit_scale * image_features @ all_text.T + logit_bias  # (n, W*n)
        return _sigmoid_loss(logits, offset=self.rank * image_features.shape[0])
