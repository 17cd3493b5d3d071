"""Deep mutual learning: N peers trained together, each distilling from the others."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import cross_entropy, kd_loss
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS


def reinitialize(module: nn.Module) -> nn.Module:
    """Fresh weights in place, with the CIFAR zoo's scheme (kaiming-normal fan-out convs, BN 1/0, default linear),
    so a peer copied from the student starts from its own random point."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Linear)):
            m.reset_parameters()
    return module


class Ensemble(nn.Module):
    """Averages the peers' probabilities; returns their log (argmax and top-k equal the mean prediction)."""

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([net(x).float().softmax(dim=1) for net in self.nets]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


@METHODS.register("dml")
class DML(Method):
    """``L_k = CE(z_k, y) + 1/(K−1)·Σ_{l≠k} τ²·KL(sg p_l ‖ p_k)`` for each of K peers; no pretrained teacher.

    Zhang et al., "Deep Mutual Learning", CVPR 2018. The student is peer 0. ``simultaneous`` sums every peer's
    loss into one update per batch (the common variant); ``alternating`` is the original algorithm: on each batch
    the peers are updated one after another, each against the others' predictions recomputed after the previous
    update (the engine runs one optimizer step per peer). Every peer and the ensemble (mean probability) are
    evaluated; every peer is exported.

    Args:
        student: peer 0, the network exported as ``student.pt``.
        num_classes: the dataset's class count (filled in by the engine; needed for peers built by name).
        peers: the other peers: ``student`` = the student's architecture with fresh weights, or a model name.
        temperature: τ (1 in the paper).
        ce_weight: weight of each peer's CE.
        kd_weight: weight of each peer's mimicry term.
        update: ``simultaneous`` or ``alternating``.
    """

    family = "online"
    paper = "Zhang et al., Deep Mutual Learning (CVPR 2018)"
    summary = "peers learn together, each mimicking the others (no pretrained teacher)"
    needs_teacher = False

    def __init__(
        self,
        student: nn.Module,
        num_classes: int | None = None,
        peers: list[str] | None = None,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        update: Literal["simultaneous", "alternating"] = "simultaneous",
    ) -> None:
        super().__init__(student)
        peers = ["student"] if peers is None else list(peers)
        if not peers:
            raise ValueError("DML needs at least one peer besides the student (peers: [student])")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if update not in ("simultaneous", "alternating"):
            raise ValueError(f"update must be simultaneous or alternating, got {update!r}")
        nets = []
        for name in peers:
            if name == "student":
                nets.append(reinitialize(copy.deepcopy(student)))
            else:
                from kdforge.models import create_model  # peers by name come from the model registry

                nets.append(create_model(name, num_classes=num_classes or getattr(student, "num_classes", None)))
        self.peers = nn.ModuleList(nets)
        self.peer_names = peers
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight
        self.update = update

    @property
    def nets(self) -> list[nn.Module]:
        return [self.student, *self.peers]

    @property
    def substeps(self) -> int:
        return len(self.nets) if self.update == "alternating" else 1

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return self.update == "alternating"  # each substep trains one peer; the others get no gradient

    def _peer_loss(self, k: int, logits: list[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        others = [z.detach() for j, z in enumerate(logits) if j != k]
        ce = self.ce_weight * cross_entropy(logits[k], y)
        kl = self.kd_weight * torch.stack([kd_loss(logits[k], z, self.temperature) for z in others]).mean()
        return ce, kl

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        x, y = batch.input, batch.target
        if self.update == "alternating":
            k = progress.substep
            logits = []
            for j, net in enumerate(self.nets):
                if j == k:
                    logits.append(net(x))
                else:
                    with torch.no_grad():
                        logits.append(net(x))
            ce, kl = self._peer_loss(k, logits, y)
            return StepOutput(loss=ce + kl, losses={"ce": ce, "kl": kl}, logits=logits[0])
        logits = [net(x) for net in self.nets]
        parts = [self._peer_loss(k, logits, y) for k in range(len(logits))]
        ce = torch.stack([p[0] for p in parts]).sum()
        kl = torch.stack([p[1] for p in parts]).sum()
        return StepOutput(loss=ce + kl, losses={"ce": ce, "kl": kl}, logits=logits[0])

    def evaluators(self) -> dict[str, nn.Module]:
        out = {f"peer{k + 1}": net for k, net in enumerate(self.peers)}
        out["ensemble"] = Ensemble(self.nets)
        return out

    def exports(self) -> dict[str, nn.Module]:
        return {"student": self.student, **{f"peer{k + 1}": net for k, net in enumerate(self.peers)}}


__all__ = ["DML", "Ensemble", "reinitialize"]
