"""``matching``: per-class gradient matching (DC: Zhao, Mopuri & Bilen, ICLR 2021; with
siamese augmentation DSA: Zhao & Bilen, ICML 2021; along a GTN's curriculum: Medvedev &
D'yakonov, AIST 2021)."""

from __future__ import annotations

import torch
from torch import nn

from ..engine import TrainConfig, train
from ..inner import load_params, rate_list, student_steps
from ..matching import matching_loss
from ..teacher import Teacher
from .base import RealSampler, Strategy, StudentFactory, register_strategy

__all__ = ["Matching", "freeze_batch_norm", "BN_REAL_PER_CLASS"]

@register_strategy("matching")
class Matching(Strategy):
    """DC / DSA: per-class gradient matching with DC's outer/inner loops."""

    def step(self, teacher: Teacher, optimizer: torch.optim.Optimizer, real: RealSampler,
             make_student: StudentFactory, generator: torch.Generator) -> dict[str, float]:
        cfg = self.config
        if cfg.match_curriculum and teacher.has_curriculum:
            return self._along_curriculum(teacher, optimizer, real, make_student, generator)
        outer, inner = teacher.matching_loops()
        outer, inner = cfg.outer_loop or outer, cfg.inner_loop or inner
        net = make_student(generator)
        net.train()
        batch_norm = _has_batch_norm(net)
        losses = []
        for ol in range(outer):
            if batch_norm:
                freeze_batch_norm(net, real, generator)
            xr = [real.class_batch(c, cfg.per_class, generator) for c in range(real.num_classes)]
            syn = teacher.class_batches(generator)
            loss = self._fast(
                lambda real_net, n, xr=xr, syn=syn: matching_loss(
                    n, xr, [x for x, _ in syn], [y for _, y in syn], cfg.distance, self.augment,
                    generator, real_model=real_net, real_chunk=cfg.real_chunk),
                net, net)
            losses.append(self._update(loss, teacher, optimizer))
            if ol == outer - 1:
                break
            with torch.no_grad():  # the student trains on constants
                x, y = teacher.batch(None, generator)
            # DSA trains the student with its own strategy, parameters per image (DSA's
            # main.py: epoch(..., aug=True) -> DiffAugment(img, args.dsa_strategy, param))
            inner_cfg = TrainConfig(epochs=inner, lr=cfg.net_lr, momentum=0.0, weight_decay=0.0,
                                    batch_size=256, decay_at=None,
                                    augmentation=f"dsa:{cfg.augment}" if cfg.augment else "")
            self._fast(lambda m, x=x, y=y, c=inner_cfg: train(m, x.detach(), y.detach(), c,
                                                               generator), net)
        return {"loss": sum(losses) / len(losses)}

    def _along_curriculum(self, teacher: Teacher, optimizer: torch.optim.Optimizer,
                          real: RealSampler, make_student: StudentFactory,
                          generator: torch.Generator) -> dict[str, float]:
        """Match the T curriculum batches in order at the states the student visits.

        Gradient matching for a generative teacher (Medvedev & D'yakonov, AIST 2021) made to
        follow the few-step protocol the teacher is scored by: step t matches the gradient of
        curriculum batch t, class by class, against a real batch of each class present, at
        the student after steps 0..t-1 (taken on the earlier curriculum batches with the
        teacher's lr and momentum), updates the teacher, then takes step t itself. So the
        states where gradients are compared are those a student trained on the curriculum
        passes through, and the learned noise of every step is trained.
        """
        cfg = self.config
        net = make_student(generator)
        net.train()
        batch_norm = _has_batch_norm(net)
        order = teacher.order(generator)
        lr, momentum = (torch.as_tensor(r).detach() for r in self._rates(teacher))
        lrs = [float(v) for v in rate_list(lr, len(order), "learning rates")]
        mu = float(momentum)
        params = [p.detach() for p in net.parameters()]
        buffers: list[torch.Tensor | None] | None = None
        losses = []
        for t, choice in enumerate(order):
            load_params(net, params)
            if batch_norm:
                freeze_batch_norm(net, real, generator)
            x, y = teacher.step_batch(choice, generator)
            hard = y if y.dim() == 1 else y.argmax(1)
            present = [c for c in range(real.num_classes) if bool((hard == c).any())]
            picks = [(hard == c).nonzero().flatten() for c in present]
            xr = [real.class_batch(c, cfg.per_class, generator) for c in present]
            xs, ys = [x[i] for i in picks], [y[i] for i in picks]
            loss = self._fast(
                lambda real_net, n, xr=xr, xs=xs, ys=ys, present=present: matching_loss(
                    n, xr, xs, ys, cfg.distance, self.augment, generator, real_model=real_net,
                    real_chunk=cfg.real_chunk, classes=present),
                net, net)
            losses.append(self._update(loss, teacher, optimizer))
            net.train()
            state = student_steps(net, params, [(x.detach(), y.detach())],
                                  lrs[t], mu, cfg.inner_weight_decay,
                                  buffers=buffers)
            params, buffers = state.params, state.buffers
        return {"loss": sum(losses) / len(losses)}


def _has_batch_norm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


#: Real images per class the DC reference passes through a batch-norm student before matching.
BN_REAL_PER_CLASS = 16


@torch.no_grad()
def freeze_batch_norm(net: nn.Module, real: RealSampler, generator: torch.Generator,
                      per_class: int = BN_REAL_PER_CLASS) -> None:
    """Update the running statistics of ``net``'s batch norms with one forward pass of
    ``per_class`` real images of every class (train mode: momentum 0.1), then freeze them
    (eval mode) for the matching that follows; the student's own training (``train``) puts
    them back in train mode. As the DC reference's ``main.py`` does before every outer step
    ("Synthetic data batch, e.g. only 1 image/batch, is too small to obtain stable mu and
    sigma", BNSizePC = 16)."""
    x = torch.cat([real.class_batch(c, per_class, generator) for c in range(real.num_classes)])
    net.train()
    net(x)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
