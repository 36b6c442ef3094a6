"""What ``unrolled`` and ``implicit`` share: T student steps taken one graph at a time, an
exactly differentiated tail, and the steps before it either first-order (implicit's
``unroll_tail``) or rebuilt one by one (unrolled's ``recompute``); and the replayable batches
that make a step recomputed in a backward pass see the batch it trained on."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..engine import classification_loss
from ..errors import ConfigError
from ..hypergrad import (
    StepRecord,
    grad_or_zero,
    step_size_hypergradient,
    trajectory_coefficients,
    trajectory_hypergradient,
)
from ..inner import real_loss, student_steps
from ..teacher import Batch, StepChoice, Teacher
from .base import RealSampler, Strategy

__all__: list[str] = []  # shared by unrolled.py and implicit.py only

class _Stepwise(Strategy):
    """The meta-gradient through T student steps taken one graph at a time: the steps run
    without a graph (their states kept), an exactly differentiated tail of them, and the
    steps before it either first-order (implicit) or rebuilt one by one (unrolled)."""

    def _tail_step(self, teacher: Teacher, optimizer: torch.optim.Optimizer,
                   real: RealSampler, net: nn.Module, order: list[StepChoice],
                   lrs: list[float], momentum: float, generator: torch.Generator, tail: int,
                   exact: bool) -> dict[str, float]:
        """The first T − ``tail`` steps plain (states kept), the last ``tail`` with their
        graph; the exact gradient through the tail reaches the teacher
        (its batches, lr and momentum) and, as ``v`` (the parameters) and ``u`` (the
        momentum buffer) at the tail's start, drives the head: the first-order trajectory
        gradient (implicit's ``unroll_tail``) or, ``exact``, the step-by-step backward pass
        (unrolled's ``recompute``)."""
        cfg = self.config
        t_count = len(order)
        h = t_count - min(tail, t_count)
        batch = _replayable(teacher, order, generator)
        xr, yr = real.batch(cfg.real_batch, generator)
        # intermediate losses (``exact``: unrolled's): the student scored after these steps
        every = cfg.intermediate_every if exact else 0
        scored = {t for t in range(t_count - 1) if every and (t + 1) % every == 0}
        weight = cfg.intermediate_weight / len(scored) if scored else 0.0
        trainable = [p.requires_grad for p in net.parameters()]
        if exact and not all(trainable):
            raise ConfigError("recompute needs a student whose parameters all train")
        snapshots: list[list[torch.Tensor]] = []
        states: list[tuple[list[torch.Tensor], list[torch.Tensor | None]]] = []

        def remember(t: int, ps: list[torch.Tensor]) -> None:
            snapshots.append([q.detach().clone() for q, keep_q in zip(ps, trainable) if keep_q])

        params0 = [p.detach() for p in net.parameters()]
        if not exact:  # the first-order head reads consecutive snapshots
            remember(-1, params0)
        head_params = params0
        head_bufs: list[torch.Tensor | None] = [None] * len(params0)
        if exact:  # step by step, keeping each step's parameters and momentum buffers
            for t in range(h):
                states.append((head_params, head_bufs))
                with torch.no_grad():
                    xb = batch(t)()
                st = student_steps(net, head_params, [xb], lrs[t:t + 1], momentum,
                                   cfg.inner_weight_decay, buffers=head_bufs)
                head_params, head_bufs = st.params, list(st.buffers)
        elif h:
            head = student_steps(net, params0, (_no_graph(batch(t)) for t in range(h)),
                                 lrs[:h], momentum, cfg.inner_weight_decay,
                                 after_step=remember)
            head_params, head_bufs = head.params, list(head.buffers)
        lr, mom = self._rates(teacher)
        tail_lr = lr[h:] if torch.is_tensor(lr) and lr.dim() == 1 else lr
        w = [p.detach().requires_grad_() for p in head_params]
        bufs = [None if b is None else b.detach().requires_grad_() for b in head_bufs]

        def score(t: int, ps: list[torch.Tensor]) -> torch.Tensor | None:
            return real_loss(net, ps, xr, yr) if h + t in scored else None

        last = student_steps(net, w, (batch(t)() for t in range(h, t_count)),
                             tail_lr, mom, cfg.inner_weight_decay, differentiable=True,
                             buffers=bufs, after_step=score if scored else None)
        outer = real_loss(net, last.params, xr, yr)
        if last.losses:
            outer = outer + weight * torch.stack(last.losses).sum()
        hparams = [p for p in teacher.parameters() if p.requires_grad]
        buf_leaves: list[torch.Tensor] = [b for b in bufs if b is not None]
        full = grad_or_zero(outer, [*hparams, *w, *buf_leaves])
        grads = full[:len(hparams)]
        v = [g for g, keep_q in zip(full[len(hparams):len(hparams) + len(w)], trainable)
             if keep_q]
        if exact and h:
            scores = {t: weight for t in scored if t < h}
            head_grads, head_loss = self._exact_head(
                teacher, net, states, head_params, batch, v, full[len(hparams) + len(w):],
                hparams, scores, (xr, yr))
            grads = [a + b for a, b in zip(grads, head_grads)]
            outer = outer.detach() + head_loss
        elif h:
            picks = list(range(h))
            if cfg.mixed_sample is not None and cfg.mixed_sample < h:
                picks = torch.randperm(h, generator=generator)[:cfg.mixed_sample].tolist()
            scale = h / len(picks)
            coeffs = trajectory_coefficients(lrs[:h], momentum)
            extra = None
            if buf_leaves:  # buf_{h-1} = Σ_t m^{h-1-t} g_t reaches the tail too
                u = [g for g, keep_q in zip(full[len(hparams) + len(w):], trainable) if keep_q]
                extra = ([-scale * momentum ** (h - 1 - t) for t in picks], u)
            head_grads = trajectory_hypergradient(
                net, [snapshots[t] for t in picks], [batch(t) for t in picks],
                [scale * coeffs[t] for t in picks], v, hparams, classification_loss,
                extra=extra)
            grads = [a + b for a, b in zip(grads, head_grads)]
            if cfg.step_size_grad:
                record = StepRecord(momentum)
                for t in range(h):
                    record.add([(a - b) / lrs[t] for a, b in zip(snapshots[t], snapshots[t + 1])])
                fresh = self._rates(teacher)[0]  # the tail's backward freed lr's graph
                head_lr = fresh[:h] if torch.is_tensor(fresh) and fresh.dim() == 1 else fresh
                step_grads = step_size_hypergradient(record, v, head_lr,
                                                     teacher.momentum_tensor(), hparams)
                grads = [g + s for g, s in zip(grads, step_grads)]
        return {"loss": self._update(outer, teacher, optimizer, grads)}

    def _exact_head(self, teacher: Teacher, net: nn.Module,
                    states: list[tuple[list[torch.Tensor], list[torch.Tensor | None]]],
                    end: list[torch.Tensor], batch: Callable[[int], Callable[[], Batch]],
                    v: list[torch.Tensor], u: list[torch.Tensor], hparams: Sequence[torch.Tensor],
                    scores: dict[int, float], real: Batch
                    ) -> tuple[list[torch.Tensor], float]:
        """The backward pass through the head steps, last first: each step is rebuilt from its
        kept parameters and momentum buffer with its graph (batch, learned lr and momentum),
        and the gradient with respect to its outputs (``v`` for the parameters, ``u`` for the
        non-empty momentum buffers) is pulled back through it to the teacher and to the
        step's inputs (a Hessian-vector product), which the step before receives. Step t in
        ``scores`` adds ``scores[t]`` x the gradient of the real-batch loss after it (an
        intermediate loss) to what its output parameters receive (``end``: after the head).
        Returns the teacher's gradient and the weighted intermediate losses' value."""
        cfg = self.config
        total = [torch.zeros_like(p) for p in hparams]
        scored = 0.0
        grad_w, grad_b = list(v), list(u)
        for t in reversed(range(len(states))):
            params, bufs = states[t]
            if t in scores:
                after = [p.detach().requires_grad_()
                         for p in (states[t + 1][0] if t + 1 < len(states) else end)]
                loss = real_loss(net, after, real[0], real[1])
                g = torch.autograd.grad(loss, after)
                scored += scores[t] * float(loss.detach())
                grad_w = [a + scores[t] * b for a, b in zip(grad_w, g)]
            lr, mom = self._rates(teacher)
            lr_t = lr[t:t + 1] if torch.is_tensor(lr) and lr.dim() == 1 else lr
            w = [p.detach().requires_grad_() for p in params]
            b_in = [None if b is None else b.detach().requires_grad_() for b in bufs]
            st = student_steps(net, w, [batch(t)()], lr_t, mom, cfg.inner_weight_decay,
                               differentiable=True, buffers=b_in)
            outs = [*st.params, *[b for b in st.buffers if b is not None]]
            if len(outs) != len(grad_w) + len(grad_b):
                raise RuntimeError("momentum buffers appeared or vanished between steps")
            b_leaves = [b for b in b_in if b is not None]
            got = grad_or_zero(outs, [*hparams, *w, *b_leaves], [*grad_w, *grad_b])
            total = [a + g for a, g in zip(total, got[:len(hparams)])]
            grad_w = got[len(hparams):len(hparams) + len(w)]
            grad_b = got[len(hparams) + len(w):]
        return total, scored


def _plain_rates(lr: float | torch.Tensor, momentum: float | torch.Tensor, steps: int
                 ) -> tuple[list[float], float]:
    """The student's per-step learning rates and momentum as plain numbers."""
    lrs = [float(lr)] * steps if not torch.is_tensor(lr) else \
        (lr.detach().expand(steps) if lr.dim() == 0 else lr.detach()).tolist()
    return lrs, float(momentum.detach()) if torch.is_tensor(momentum) else float(momentum)


def _replayable(teacher: Teacher, order: list[StepChoice], generator: torch.Generator
                ) -> Callable[[int], Callable[[], Batch]]:
    """``batch(t)()`` builds step t's batch, the same one every time it is called (a step
    recomputed in a backward pass must see the batch it trained on). Fresh-noise steps
    (curriculum ``none``) get a seed each, drawn once from ``generator``; steps on learned
    noise draw nothing."""
    seeds = [None if c is not None else
             int(torch.randint(2 ** 62, (1,), generator=generator)) for c in order]

    def batch(t: int) -> Callable[[], Batch]:
        def build() -> Batch:
            seed = seeds[t]
            if seed is None:
                return teacher.step_batch(order[t], generator)
            g = torch.Generator()
            g.manual_seed(seed)
            return teacher.step_batch(order[t], g)
        return build
    return batch


def _no_graph(build: Callable[[], Batch]) -> Batch:
    with torch.no_grad():
        return build()
