"""``ContextEmbeddings``: the per-class fg/bg context embeddings as an nn.Module."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops


class ContextEmbeddings(nn.Module):
    """Per-class foreground and background context embeddings (CREAM, Eqs. 3-4).

    Holds two float32 [num_classes, dim] buffers, ``fg`` and ``bg``, so they live
    in the state_dict and move with ``.to()``. ``update`` applies the fused
    momentum update; ``reactivate`` runs the EM re-activation from them.

    Under torch.distributed (an initialised default group, or ``process_group``,
    with more than one rank), ``update`` follows SPEC.md: every rank computes its
    samples' masked means, all ranks gather them (with the mask flags and labels)
    in rank order, and each applies the same global update with the same kernel,
    so the buffers stay bit-identical across ranks. The first distributed update
    also broadcasts the buffers from the group's first rank, so ranks that
    started from different random initialisations agree from then on.

    Args:
        num_classes: C.
        dim: d, the channel count of the feature map.
        momentum: lambda in [0, 1] (paper: 0.8); 1.0 never moves the embeddings.
        cam_threshold: r in [0, 1] of the CAM foreground mask.
        init: "zeros" (default) or "random" (standard normal, from ``generator``).
    """

    fg: Tensor
    bg: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        momentum: float = 0.8,
        cam_threshold: float = 0.2,
        init: str = "zeros",
        *,
        generator: Optional[torch.Generator] = None,
        device=None,
        process_group=None,
    ) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.momentum = ops._check_number("momentum", momentum, 0.0, 1.0)
        self.cam_threshold = ops._check_number("cam_threshold", cam_threshold, 0.0, 1.0)
        if init == "zeros":
            fg = torch.zeros(num_classes, dim, device=device)
            bg = torch.zeros(num_classes, dim, device=device)
        elif init == "random":
            fg = torch.randn(num_classes, dim, generator=generator).to(device)
            bg = torch.randn(num_classes, dim, generator=generator).to(device)
        else:
            raise ValueError(f"init must be 'zeros' or 'random', got {init!r}")
        self.register_buffer("fg", fg)
        self.register_buffer("bg", bg)
        self.process_group = process_group
        self._synced = False

    @property
    def num_classes(self) -> int:
        return self.fg.shape[0]

    @property
    def dim(self) -> int:
        return self.fg.shape[1]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, cam_threshold={self.cam_threshold}"

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    @torch.no_grad()
    def update(
        self,
        features: Tensor,
        labels: Tensor,
        *,
        cam: Optional[Tensor] = None,
        classifier_weight: Optional[Tensor] = None,
        backend: Optional[str] = None,
    ) -> None:
        """Move the embeddings of ``labels`` towards this batch's masked means.

        Exactly one of ``cam`` [B, h, w] or ``classifier_weight`` [C, d]."""
        if self._world() == 1:
            ops.update_context_embeddings(
                self.fg, self.bg, features, labels, cam=cam, classifier_weight=classifier_weight,
                momentum=self.momentum, cam_threshold=self.cam_threshold, backend=backend,
            )
            return
        means, nonempty = ops.context_stats(
            features, labels, cam=cam, classifier_weight=classifier_weight,
            cam_threshold=self.cam_threshold, num_classes=self.num_classes, backend=backend,
        )
        means, nonempty, labels = self._gather(means, nonempty.to(torch.uint8), labels.to(torch.int64))
        if not self._synced:
            src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
            dist.broadcast(self.fg, src, group=self.process_group)
            dist.broadcast(self.bg, src, group=self.process_group)
            self._synced = True
        ops.context_apply(self.fg, self.bg, means, nonempty, labels, momentum=self.momentum, backend=backend)

    def _gather(self, means: Tensor, nonempty: Tensor, labels: Tensor):
        """All-gather per-sample statistics in rank order; ranks may hold different batch sizes."""
        group, world = self.process_group, self._world()
        size = torch.tensor([means.shape[0]], device=means.device, dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        counts = [int(s.item()) for s in sizes]
        top = max(counts)

        def gather(t: Tensor) -> Tensor:
            padded = t.new_zeros((top,) + tuple(t.shape[1:]))
            padded[: t.shape[0]] = t
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded.contiguous(), group=group)
            return torch.cat([p[:n] for p, n in zip(parts, counts)])

        return gather(means), gather(nonempty), gather(labels)

    def reactivate(self, features: Tensor, cam: Optional[Tensor], labels: Tensor, **kwargs):
        """``em_reactivate`` from this module's tables (rows picked by ``labels``,
        [B] or [B, K] for K classes per image). ``cam`` may be None when
        ``classifier_weight=`` is given (the CAM is then computed in the kernel).

        Keyword arguments (classifier_weight, num_iters, sigma (a number or
        "auto"), cam_threshold, similarity, return_extras, backend) are passed on."""
        kwargs.setdefault("cam_threshold", self.cam_threshold)
        return ops.em_reactivate(features, cam, self.fg, self.bg, labels, **kwargs)
