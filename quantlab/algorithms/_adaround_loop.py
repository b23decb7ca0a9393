"""AdaRound's optimization of one layer's rounding: the eager loop, and on CUDA the
same iteration captured once as a CUDA graph and replayed.

Why a graph: one iteration is ~40 small kernels (soft weight, the layer, the loss,
the regularizer, their backward, Adam) on a mini-batch of 32 cached samples, so on
a fast GPU the loop is bound by the host launching them. The graphed iteration reads
everything that changes between iterations from device tensors (the mini-batch's
sample indices, beta, the regularizer's weight, an iteration counter that the graph
advances itself), so a replay is one launch and the host never waits for the device
except at a few checkpoints.

Both loops draw the mini-batches from one index tensor for all iterations, drawn on
the host from the caller's generator (the draws the per-iteration ``randint`` calls
made before: the same samples) and copied to the device once.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional, Sequence

import torch

from quantlab.graph_capture import state_kept_on_failure

_LOG = logging.getLogger(__name__)

# Iterations between NaN checks: each reads one value back from the device.
CHECK_EVERY = 100
# Eager iterations of the graphed loop before the capture (cuDNN/cuBLAS plans, Adam's state,
# the allocator): real iterations, run by the same step as the replays.
WARMUP = 2

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NonFinite(Exception):
    """The loss or the rounding variables stopped being finite at (or before) ``iteration``."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"iteration {iteration}")
        self.iteration = iteration


@dataclasses.dataclass
class Outcome:
    """What the loop reports: the reconstruction loss of the first and last mini-batch, and how it ran."""

    first_loss: float
    last_loss: float
    mode: str  # "eager", "cuda-graph", or "eager (...)" after a failed capture


def batch_indices(samples: int, batch: int, iterations: int, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """``(iterations, batch)`` sample indices: row i is iteration i's mini-batch.

    One ``randint`` draws the numbers ``iterations`` calls of ``randint(.., (batch,))``
    drew one after the other (the CPU generator fills in order), so the mini-batches are
    those of the former per-iteration draw.
    """
    index = torch.randint(0, samples, (iterations, batch), generator=generator)
    return index.to(device)


def optimize(rounding: torch.nn.Module, loss_of: LossFn, inputs: torch.Tensor, targets: torch.Tensor,
             index: torch.Tensor, betas: Sequence[Optional[float]], reg_weight: float, lr: float,
             cuda_graph: bool = True) -> Outcome:
    """Trains ``rounding.v`` for ``len(betas)`` iterations (see :mod:`quantlab.algorithms.adaround`).

    Args:
        rounding: The layer's ``LayerRounding``.
        loss_of: ``loss_of(weight, x, y)``: the reconstruction loss of a mini-batch.
        inputs, targets: The cached samples (on the layer's device).
        index: :func:`batch_indices` (on the same device).
        betas: Per iteration, the regularizer's beta (None: no regularizer, the warm start).
        reg_weight: The regularizer's weight (lambda).
        lr: Adam's learning rate.
        cuda_graph: Replay the iteration as a CUDA graph when on a CUDA device; on any
            failure to capture it, the layer is optimized again from the start, eagerly.

    Raises:
        NonFinite: the loss or ``v`` became NaN or Inf (checked every :data:`CHECK_EVERY`
            iterations and at the end).
    """
    if cuda_graph and inputs.device.type == "cuda" and len(betas) > WARMUP:
        start = rounding.v.detach().clone()
        try:
            return _graphed(rounding, loss_of, inputs, targets, index, betas, reg_weight, lr)
        except NonFinite:
            raise
        except Exception as error:  # noqa: BLE001 - any capture failure: the eager loop gives the answer
            _LOG.info("adaround: the optimization was not captured as a CUDA graph (%s); running it eagerly", error)
            torch.cuda.synchronize(inputs.device)
            with torch.no_grad():
                rounding.v.copy_(start)
            rounding.v.grad = None
            outcome = _eager(rounding, loss_of, inputs, targets, index, betas, reg_weight, lr)
            outcome.mode = f"eager (CUDA graph capture failed: {type(error).__name__})"
            return outcome
    return _eager(rounding, loss_of, inputs, targets, index, betas, reg_weight, lr)


def _eager(rounding: torch.nn.Module, loss_of: LossFn, inputs: torch.Tensor, targets: torch.Tensor,
           index: torch.Tensor, betas: Sequence[Optional[float]], reg_weight: float, lr: float) -> Outcome:
    optimizer = torch.optim.Adam([rounding.v], lr=lr)
    v = rounding.v
    last = len(betas) - 1
    first_loss = last_loss = math.nan
    for iteration, beta in enumerate(betas):
        rows = index[iteration]
        # Advanced indexing, not index_select: on a CPU index_select of activation-sized rows
        # is ~5x slower (measured: 0.26 s against 0.05 s for 32 x 32 x 120 x 120 floats).
        reconstruction = loss_of(rounding.soft_weight(), inputs[rows], targets[rows])
        loss = reconstruction if beta is None else reconstruction + reg_weight * rounding.regularizer(beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if iteration % CHECK_EVERY == 0 or iteration == last:
            if not math.isfinite(float(loss.detach())) or not bool(torch.isfinite(v).all()):
                raise NonFinite(iteration)
            if iteration == 0:
                first_loss = float(reconstruction.detach())
            last_loss = float(reconstruction.detach())
    return Outcome(first_loss, last_loss, "eager")


class GraphStep:
    """One iteration that reads every per-iteration value from device tensors (so it can
    be captured once and replayed): the mini-batch gathered into fixed buffers, beta and
    the regularizer's weight (0 during the warm start, where beta is any finite value)
    picked by a device counter, the losses written to a history, the counter advanced.

    Run eagerly it is the same computation as the eager loop, up to float rounding
    (the regularizer is computed and multiplied by 0 in the warm start; Adam's
    capturable arithmetic).
    """

    def __init__(self, rounding: torch.nn.Module, loss_of: LossFn, inputs: torch.Tensor, targets: torch.Tensor,
                 index: torch.Tensor, betas: Sequence[Optional[float]], reg_weight: float, lr: float) -> None:
        device = inputs.device
        self.rounding, self.loss_of = rounding, loss_of
        self.inputs, self.targets, self.index = inputs, targets, index
        warm = [beta is None for beta in betas]
        self.betas = torch.tensor([2.0 if w else beta for w, beta in zip(warm, betas)], device=device)
        self.weights = torch.tensor([0.0 if w else reg_weight for w in warm], device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.history = torch.zeros(len(betas), 2, device=device)  # per iteration: reconstruction, loss
        batch = index.shape[1]
        self.x = inputs.new_empty((batch,) + tuple(inputs.shape[1:]))
        self.y = targets.new_empty((batch,) + tuple(targets.shape[1:]))
        self.optimizer = torch.optim.Adam([rounding.v], lr=lr, capturable=device.type == "cuda")

    def __call__(self) -> None:
        counter = self.counter
        rows = self.index.index_select(0, counter).view(-1)
        torch.index_select(self.inputs, 0, rows, out=self.x)
        torch.index_select(self.targets, 0, rows, out=self.y)
        reconstruction = self.loss_of(self.rounding.soft_weight(), self.x, self.y)
        beta = self.betas.index_select(0, counter).view(())
        weight = self.weights.index_select(0, counter).view(())
        loss = reconstruction + weight * self.rounding.regularizer(beta)
        loss.backward()
        self.optimizer.step()
        self.history.index_copy_(0, counter, torch.stack([reconstruction.detach(), loss.detach()]).view(1, 2))
        counter.add_(1)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def check(self, done: int) -> None:
        """Raises :class:`NonFinite` (naming the first bad iteration) if a loss of the first
        ``done`` iterations or ``v`` is not finite; one read-back."""
        finite = torch.isfinite(self.history[:done]).all(1)
        if bool(finite.all()) and bool(torch.isfinite(self.rounding.v).all()):
            return
        bad = torch.nonzero(~finite).flatten()
        raise NonFinite(int(bad[0]) if bad.numel() else done - 1)

    def outcome(self, mode: str) -> Outcome:
        first, last = self.history[0, 0], self.history[-1, 0]
        return Outcome(float(first), float(last), mode)


def run_step_eagerly(step: GraphStep, iterations: int) -> Outcome:
    """The graph's iteration run eagerly ``iterations`` times (a reference for the replay)."""
    for done in range(1, iterations + 1):
        step.zero_grad()
        step()
        if done % CHECK_EVERY == 0 or done == iterations:
            step.check(done)
    return step.outcome("eager graph step")


def _graphed(rounding: torch.nn.Module, loss_of: LossFn, inputs: torch.Tensor, targets: torch.Tensor,
             index: torch.Tensor, betas: Sequence[Optional[float]], reg_weight: float, lr: float) -> Outcome:
    device = inputs.device
    iterations = len(betas)
    step = GraphStep(rounding, loss_of, inputs, targets, index, betas, reg_weight, lr)
    for _ in range(WARMUP):  # cuDNN/cuBLAS plans, Adam's state, the allocator: real iterations
        step.zero_grad()
        step()
    step.check(WARMUP)
    graph = torch.cuda.CUDAGraph()
    step.zero_grad()  # the captured backward then writes the gradient (a buffer of the graph's pool)
    torch.cuda.synchronize(device)
    # capture_begin/end directly: torch.cuda.graph() would also run gc.collect() and empty_cache()
    # for every layer.
    with torch.cuda.device(device), state_kept_on_failure(device), torch.cuda.stream(torch.cuda.Stream(device)):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            step()
        finally:
            graph.capture_end()
    done = WARMUP
    while done < iterations:
        upto = min(iterations, (done // CHECK_EVERY + 1) * CHECK_EVERY)
        for _ in range(upto - done):
            graph.replay()
        done = upto
        step.check(done)
    outcome = step.outcome("cuda-graph")
    rounding.v.grad = None
    del graph
    return outcome
