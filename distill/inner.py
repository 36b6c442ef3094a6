"""The inner loop: T student SGD steps as a function of the parameters, written once.

``student_steps(model, params, batches, lrs, momentum, weight_decay) -> params`` is the
functional inner loop of learn2learn's ``adapt`` / torchopt's functional optimisers: the
student's parameters are a list of tensors that the function maps to new ones, and the module
only supplies the architecture (:func:`torch.func.functional_call`). Every user of "train a
student for T steps" calls it: the unrolled (Wang et al. 2018; Such et al., ICML 2020) and
implicit (Lorraine, Vicol & Duvenaud, AISTATS 2020) strategies, the checkpointed unroll of
:mod:`distill.unrolled`, a GTN's few-step score and its architecture-search proxy.

The step is SGD as ``torch.optim.SGD`` takes it (no dampening, no Nesterov)::

    d_t = g_t + wd · p_t                    (g_t the gradient of the step's batch loss)
    b_t = d_t            (t = 0)   |   b_t = μ_t · b_{t−1} + d_t
    p_{t+1} = p_t − η_t · b_t

With ``differentiable=True`` the new parameters keep a graph to the old ones, to the
batches (so to the teacher) and to ``lrs`` / ``momentum`` tensors (learned per-step rates,
Such et al.); the update is then written out as above (``higher``'s DifferentiableSGD). With
``differentiable=False`` no graph is kept; with float rates the update then takes
``torch.optim.SGD``'s own arithmetic (fused ``add(alpha=...)``), so the result is the one an
``SGD`` optimiser stepping the module gives, bit for bit.

``after_step(t, params)`` is called after step ``t`` (0-based) with the new parameters; what
it returns (a loss tensor, or ``None``) is collected in :attr:`InnerState.losses`: the hook
for *intermediate losses* (the student scored on real data during the inner loop, the GTN
paper's meta-loss) and for monitoring.
"""

from __future__ import annotations

import copy
import itertools
import logging
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from .engine import classification_loss
from .memory import saved_tensor_hooks_active
from .models import fast_path, fused_norm_derivatives
from .teacher import Batch

__all__ = ["InnerState", "Rate", "compiled_call", "compiled_scoring", "forward", "load_params",
           "per_step", "rate_list", "real_loss", "score_chunk", "student_steps"]

log = logging.getLogger(__name__)

# A learning rate or momentum: one float / () tensor for every step, or one per step
# (a sequence of floats / () tensors, or a (T,) tensor).
Rate = float | torch.Tensor | Sequence[float | torch.Tensor]
AfterStep = Callable[[int, list[torch.Tensor]], torch.Tensor | None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class InnerState:
    """The student after the inner loop.

    Attributes:
        params: the parameters, in ``model.parameters()`` order.
        buffers: the momentum buffers (``None`` entries when no momentum is used), to continue
            the loop where it stopped (truncated / checkpointed unrolls).
        losses: what ``after_step`` returned, in step order (``None`` results left out).
        step_losses: each step's training loss on its batch, before its update (detached).
    """

    params: list[torch.Tensor]
    buffers: list[torch.Tensor | None]
    losses: list[torch.Tensor] = field(default_factory=list)
    step_losses: list[torch.Tensor] = field(default_factory=list)


def forward(model: nn.Module, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``params`` in place of its parameters (its buffers are its own)."""
    names = [n for n, _ in model.named_parameters()]
    return functional_call(model, dict(zip(names, params)), (x,))


#: Bytes of a student's first activation per piece of a chunked real-data scoring on a CPU
#: (:func:`score_chunk`): the piece's tensors stay near the caches and below glibc's mapping
#: threshold. Measured on the MNIST GTN student (width 16, 28 px, 1 thread, glibc's default
#: allocator): 512 real images scored (forward + gradient) in 94 ms whole, 71 ms in pieces of
#: 64 or 128, 81 ms of 32, 94 ms of 16 (on a loaded machine: 113 whole, 83 in 4 MiB pieces).
#: With :func:`distill.allocator.keep_freed_memory` whole and pieces take the same (80, 81).
SCORE_PIECE_BYTES = 4 << 20


def score_chunk(model: nn.Module, images: torch.Tensor) -> int | None:
    """Images per piece of :func:`real_loss` on ``images``' device: on a CPU, as many as keep
    the student's first activation (its first convolution's width x H x W floats per image)
    near :data:`SCORE_PIECE_BYTES`, at least 8, made equal where a divisor of the batch lies
    within twice as many pieces (512 MNIST images through a width-16 student: 8 pieces of
    64, not 6 of 83 and one of 14, so ``--compile`` builds one graph for them); ``None``
    (the whole batch) on other devices and for students with batch norm (whose statistics
    are the batch's)."""
    if images.device.type != "cpu" or images.dim() != 4:
        return None
    width = images.shape[1]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return None
        if isinstance(m, nn.Conv2d) and width == images.shape[1]:
            width = m.out_channels
    per_image = width * images.shape[2] * images.shape[3] * images.element_size()
    chunk = max(8, SCORE_PIECE_BYTES // max(per_image, 1))
    n = images.shape[0]
    pieces = -(-n // chunk)
    for p in range(pieces, 2 * pieces + 1):  # equal pieces: one compiled shape, not two
        if n % p == 0 and n // p >= 8:
            return n // p
    return chunk


_COMPILE = [False]
_COMPILE_STEPS = [True]  # compiled_scoring(steps=...): steps without a graph, the generator
#: (architecture, loss, device) -> compiled ``score(params, x, y)``; ``None``: it failed once
_SCORERS: dict[tuple, Callable[..., torch.Tensor] | None] = {}


@contextmanager
def compiled_scoring(on: bool = True, steps: bool = True) -> Iterator[None]:
    """Within the block, :func:`real_loss` on the fast path computes each piece's forward
    and gradient with ``torch.compile`` (inductor's fused kernels: the student's
    normalisation, activation and pooling in a few passes over memory instead of one per
    operator; 512 MNIST images through the GTN student, 1 thread: 64 -> 42 ms). The same
    loss and gradient up to float rounding; one compilation per student architecture and
    piece shape per process (about 25 s on a 2-core CPU, less from inductor's on-disk cache
    after the first). Students with buffers (batch norm) and steps under saved-tensor hooks
    (the memory meter: ``torch.compile`` refuses them) stay eager; a compilation that fails
    logs one warning and that architecture stays eager. The student's steps without a graph
    (:func:`student_steps` with ``differentiable=False``: implicit's T steps, the
    first-order-tail head, matching's student step, the recomputing forward pass) take the
    same compiled loss and gradient (width-32 ConvNet, 100 MNIST images, 1 thread: 77 -> 42
    ms), and a GTN's generator runs compiled (:func:`compiled_call`); ``steps=False`` keeps
    both eager (``bench/compiled_steps.py`` compares the two).
    Instance norm's second derivative (the inner loop's double backward) is compiled too
    (:func:`distill.models.fused_norm_derivatives`)."""
    was, was_steps = _COMPILE[0], _COMPILE_STEPS[0]
    _COMPILE[0], _COMPILE_STEPS[0] = on, steps
    try:
        with fused_norm_derivatives(on):
            yield
    finally:
        _COMPILE[0], _COMPILE_STEPS[0] = was, was_steps


def compiled_call(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)``; within :func:`compiled_scoring` on the fast path, for a module in
    training mode outside the memory meter's hooks, through a ``torch.compile``-d call of
    its own (one graph per input shape and grad mode; inductor's on-disk cache serves a
    second module of the same architecture). For modules differentiated once (a GTN's
    generator: every meta-gradient reaches it first-order): same values and gradients up to
    float rounding, batch-norm statistics updated as eagerly. A compilation that fails logs
    one warning; that type stays eager."""
    kind = type(module)
    if _compiling_steps() and module.training and kind not in _FAILED_CALLS and \
            not saved_tensor_hooks_active():
        compiled = _CALLS_OF.get(module)
        if compiled is None:  # each module calls with its own variants (grad mode,
            # learned or fresh noise, batch shapes)
            compiled = _CALLS_OF[module] = _compile_own(_call, f"_call_{kind.__name__}")
        try:
            return cast(torch.Tensor, compiled(module, *args))
        except Exception as exc:  # noqa: BLE001 - a compiler failure: stay eager
            _compile_failed(kind.__name__, exc)
            _FAILED_CALLS.add(kind)
    return cast(torch.Tensor, module(*args))


def _call(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, module(*args))


def _compile_own(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``torch.compile(fn)`` on a copy of ``fn`` with a code object of its own: dynamo keeps
    its graphs and its recompilation limit (8) per code object, so functions made from one
    definition (a nested function, :func:`_call`) would otherwise share them, and past the
    limit every further variant would run eagerly."""
    code = fn.__code__.replace(co_name=name)
    own = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return torch.compile(own, dynamic=False)


#: module types whose compilation failed once (:func:`compiled_call`): they stay eager
_FAILED_CALLS: set[type] = set()
#: module -> its compiled call
_CALLS_OF: weakref.WeakKeyDictionary[nn.Module, Callable[..., torch.Tensor]] = \
    weakref.WeakKeyDictionary()


def _scorer_key(model: nn.Module, loss_fn: LossFn, device: torch.device) -> tuple:
    """What one compiled scorer serves: the architecture, its mode, the loss and the device."""
    return (type(model), repr(model), model.training, loss_fn, str(device))


def _compiled_scorer(model: nn.Module, loss_fn: LossFn, device: torch.device,
                     key: tuple | None = None) -> Callable[..., torch.Tensor] | None:
    """The compiled ``score(params, x, y) = loss_fn(model with params (x), y)`` of ``model``'s
    architecture (a private copy of the module supplies it, so every fresh student of one
    architecture shares one compilation), or ``None`` where it cannot be used. ``key``:
    :func:`_scorer_key`'s, where the caller has it."""
    if not _COMPILE[0] or next(model.buffers(), None) is not None or \
            saved_tensor_hooks_active():
        return None
    key = key or _scorer_key(model, loss_fn, device)
    if key not in _SCORERS:
        from .devices import silence_cuda_home_warning

        silence_cuda_home_warning()
        template = copy.deepcopy(model)
        names = [n for n, _ in template.named_parameters()]

        def score(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
            return loss_fn(functional_call(template, dict(zip(names, params)), (x,)), y)

        _SCORERS[key] = _compile_own(score, f"_score_{type(model).__name__}_{len(_SCORERS)}")
    return _SCORERS[key]


def _compiling_steps() -> bool:
    """Within compiled_scoring(steps=True) on the fast path: compile the steps without a
    graph and the generator."""
    return _COMPILE[0] and _COMPILE_STEPS[0] and fast_path()


def _compile_failed(what: str, exc: Exception, key: tuple | None = None) -> None:
    """Log one warning for a failed compilation of ``what``; a scorer's ``key`` stays eager."""
    log.warning("torch.compile of %s failed (%s); continuing eagerly", what,
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    if key is not None:
        _SCORERS[key] = None


def _score_piece(score: Callable[..., torch.Tensor], leaves: list[torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, wanted: list[bool], scale: float | None
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``scale`` x ``score(leaves, x, y)`` and its gradient to the ``wanted`` leaves."""
    loss = score(leaves, x, y)
    if scale is not None:
        loss = loss * scale
    got = torch.autograd.grad(loss, [q for q, w in zip(leaves, wanted) if w]) \
        if any(wanted) else ()
    return loss, got


class _ScoredLoss(torch.autograd.Function):
    """The loss of a student on constant (real) images, and its gradient to the parameters
    computed at once, piece by piece; backward multiplies the kept gradient (first order
    only: the scoring is never differentiated twice)."""

    @staticmethod
    def forward(ctx: Any, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                chunk: int | None, loss_fn: LossFn, *params: torch.Tensor) -> torch.Tensor:
        names = [n for n, _ in model.named_parameters()]
        wanted = list(ctx.needs_input_grad[5:])
        n = images.shape[0]
        step = n if chunk is None else chunk
        total: torch.Tensor | None = None
        grads: list[torch.Tensor] | None = None

        def eager(ps: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(model, dict(zip(names, ps)), (x,)), y)

        key = _scorer_key(model, loss_fn, images.device) if _COMPILE[0] else None
        compiled = _compiled_scorer(model, loss_fn, images.device, key)
        with torch.enable_grad():
            for i in range(0, n, step):
                x, y = images[i:i + step], labels[i:i + step]
                leaves = [p.detach().requires_grad_(w) for p, w in zip(params, wanted)]
                scale = x.shape[0] / n if step < n else None
                if compiled is not None:
                    try:
                        loss, got = _score_piece(compiled, leaves, x, y, wanted, scale)
                    except Exception as exc:  # noqa: BLE001 - a compiler failure: stay eager
                        _compile_failed("the student's loss and gradient", exc, key)
                        compiled = None
                if compiled is None:
                    loss, got = _score_piece(eager, leaves, x, y, wanted, scale)
                total = loss.detach() if total is None else total + loss.detach()
                grads = list(got) if grads is None else [a + b for a, b in zip(grads, got)]
        ctx.save_for_backward(*(grads or []))
        assert total is not None  # n >= 1
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept = iter(ctx.saved_tensors)
        out = [grad * next(kept) if w else None for w in ctx.needs_input_grad[5:]]
        return (None, None, None, None, None, *out)


def real_loss(model: nn.Module, params: Sequence[torch.Tensor], images: torch.Tensor,
              labels: torch.Tensor, loss_fn: LossFn = classification_loss) -> torch.Tensor:
    """``loss_fn(model(images), labels)`` with ``params`` in place of the model's parameters,
    where the images are constants (real data scoring a student): the meta-loss of
    ``unrolled`` and ``implicit``.

    On the fast path (:func:`distill.models.fast_path`) the loss and its gradient to
    ``params`` are computed together when it is evaluated, in pieces of
    :func:`score_chunk` images, and only the gradient (the size of the student) is kept for
    the backward pass instead of the activations of every image: the same value and
    gradient up to float rounding, with a fraction of the saved memory (unrolled recipe,
    MNIST T = 10: 151 MiB against 830) and, on a CPU under glibc's default allocator, about
    0.7x the time of the scoring (the scoring is differentiated once; a second derivative
    raises). The plain path is the autograd graph of the forward pass.
    """
    params = list(params)
    if not fast_path() or not torch.is_grad_enabled() or \
            not any(p.requires_grad for p in params):
        return loss_fn(forward(model, params, images), labels)
    chunk = score_chunk(model, images)
    if chunk is not None and chunk >= images.shape[0]:
        chunk = None
    return cast(torch.Tensor, _ScoredLoss.apply(model, images, labels, chunk, loss_fn,
                                                *params))


@torch.no_grad()
def load_params(model: nn.Module, params: Sequence[torch.Tensor]) -> nn.Module:
    """Copy ``params`` into ``model``'s parameters (in place) and return the model."""
    for p, v in zip(model.parameters(), params):
        p.copy_(v)
    return model


def per_step(rate: Rate) -> Iterator[float | torch.Tensor]:
    """``rate`` as an endless (scalar) or finite (per-step) iterator of step values."""
    if torch.is_tensor(rate):
        return iter(rate.unbind()) if rate.dim() == 1 else itertools.repeat(rate)
    if isinstance(rate, (int, float)):
        return itertools.repeat(float(rate))
    return iter(rate)


def _count(rate: Rate) -> int | None:
    if torch.is_tensor(rate):
        return rate.numel() if rate.dim() == 1 else None
    return None if isinstance(rate, (int, float)) else len(rate)


def rate_list(rate: Rate, steps: int, name: str = "rates") -> list[float | torch.Tensor]:
    """``rate`` as a list of ``steps`` step values (a scalar is repeated: the same object).

    Raises:
        ValueError: per-step values of another length.
    """
    n = _count(rate)
    if n is not None and n != steps:
        raise ValueError(f"{n} {name} for {steps} steps")
    return list(itertools.islice(per_step(rate), steps))


def student_steps(model: nn.Module, params: Sequence[torch.Tensor], batches: Iterable[Batch],
                  lrs: Rate, momentum: Rate = 0.0, weight_decay: float = 0.0, *,
                  differentiable: bool = False,
                  buffers: Sequence[torch.Tensor | None] | None = None,
                  after_step: AfterStep | None = None,
                  loss_fn: LossFn = classification_loss) -> InnerState:
    """Train the student ``model`` with ``params`` for one SGD step per batch.

    Args:
        model: the student's architecture (its own parameters are not read nor changed; its
            buffers, e.g. batch-norm statistics, are used and updated as in training).
        params: its parameters, in ``model.parameters()`` order.
        batches: T (images (B, C, H, W), targets (B,) or (B, K)) pairs; may be a lazy
            iterable (each batch is drawn when its step comes).
        lrs: η: one value for every step, or T values (floats, () tensors or a (T,) tensor).
        momentum: μ, likewise (0: plain SGD, no buffers).
        weight_decay: wd, a float.
        differentiable: keep the graph through the steps (to params, batches, lrs, momentum).
        buffers: momentum buffers to continue from (``None``: start without).
        after_step: ``after_step(t, params)`` after each step; returned losses are collected.
        loss_fn: ``loss_fn(logits, targets)`` (default: cross-entropy, hard or soft targets).

    Returns:
        :class:`InnerState` (parameters, momentum buffers, collected losses).

    Raises:
        ValueError: per-step rates of another length than the batches.
    """
    batches = list(batches) if isinstance(batches, Sequence) else batches
    steps = len(batches) if isinstance(batches, list) else None
    for name, rate in (("learning rates", lrs), ("momenta", momentum)):
        n = _count(rate)
        if n is not None and steps is not None and n != steps:
            raise ValueError(f"{n} {name} for {steps} steps")
    names = [n for n, _ in model.named_parameters()]
    params = list(params)
    bufs: list[torch.Tensor | None] = list(buffers) if buffers is not None \
        else [None] * len(params)
    if differentiable:
        params = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
    losses: list[torch.Tensor] = []
    step_losses: list[torch.Tensor] = []
    # steps without a graph take the compiled loss and gradient within compiled_scoring()
    key = _scorer_key(model, loss_fn, params[0].device) \
        if params and not differentiable and _compiling_steps() else None
    compiled = _compiled_scorer(model, loss_fn, params[0].device, key) if key else None
    for t, ((x, y), lr, mu) in enumerate(zip(batches, per_step(lrs), per_step(momentum))):
        leaves = params if differentiable else [p.detach().requires_grad_() for p in params]
        with torch.enable_grad():
            loss = None
            if compiled is not None:
                try:
                    loss, grads = _score_piece(compiled, leaves, x.detach(), y.detach(),
                                               [True] * len(leaves), None)
                except Exception as exc:  # noqa: BLE001 - a compiler failure: stay eager
                    _compile_failed("the student's loss and gradient", exc, key)
                    compiled = None
            if loss is None:
                loss = loss_fn(functional_call(model, dict(zip(names, leaves)), (x,)), y)
                grads = torch.autograd.grad(loss, leaves, create_graph=differentiable)
        step_losses.append(loss.detach())
        # torch.optim.SGD's fused arithmetic for float rates without a graph; else written out
        fused = not differentiable and not torch.is_tensor(lr)
        use_buffers = torch.is_tensor(mu) or mu != 0
        with torch.set_grad_enabled(differentiable):
            new_p, new_b = [], []
            for p, b, g in zip(leaves, bufs, grads):
                if not differentiable:
                    p = p.detach()
                d = (g.add(p, alpha=weight_decay) if fused else g + weight_decay * p) \
                    if weight_decay else g
                if use_buffers or b is not None:  # a zero step momentum keeps the buffer
                    b = d if b is None else b * mu + d
                    d = b
                new_p.append(p.add(d, alpha=-cast(float, lr)) if fused else p - lr * d)
                new_b.append(b)
        params, bufs = new_p, new_b
        if after_step is not None:
            out = after_step(t, params)
            if out is not None:
                losses.append(out)
    return InnerState(params, bufs, losses, step_losses)
