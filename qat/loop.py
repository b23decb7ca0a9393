"""The built-in QAT training loop (classification and causal LM), resumable and DDP-ready.

* LR: a cosine decay from a small peak LR (``lr``, e.g. 1e-4, about 1% of the
  original), with optional linear warm-up, over ``total_steps``.
* Data: the loop re-batches the given dataset with its own sampler: shuffled
  with ``seed + epoch``, sharded across ranks, and able to start in the middle
  of an epoch, so a resumed run sees exactly the batches the uninterrupted run
  would have seen.
* Checkpoints: every ``checkpoint_every`` steps, written atomically by rank 0;
  they hold the model, optimizer, scheduler, step and every rank's RNG state.
* A NaN/Inf loss stops the run before the update, with an error naming the
  step; the last good checkpoint stays as it was.
* CUDA graphs (``cuda_graphs``, default ``"auto"``): on one CUDA device outside
  DDP, full batches replay the model's captured forward and backward; partial
  batches, other shapes and uncapturable steps run eagerly on the same
  parameters (see :mod:`quantlab.qat.loop_graphs` for what re-captures).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from quantlab.batching import call_model, model_device, split_batch, to_device
from quantlab.qat import ddp
from quantlab.qat.bn_fold import freeze_bn_stats
from quantlab.qat.checkpoint import CHECKPOINT_FILE, check_resume_payload, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from quantlab.qat.errors import NonFiniteLossError, QATError
from quantlab.qat.loop_graphs import LoopGraphs, check_mode, eager_reason
from quantlab.qat.sync_bn import synced_batchnorm
from quantlab.validation.fields import is_int, is_number
from quantlab.sparsity.mask import iter_masks, reapply_masks

TASKS = ("classification", "causal_lm")
# Fields that define the schedule: a resumed run must use the same values.
_SCHEDULE_FIELDS = (
    "task", "lr", "range_lr", "min_lr_ratio", "warmup_steps", "optimizer", "seed", "shuffle", "batch_size", "total_steps", "world_size",
)


@dataclasses.dataclass
class TrainConfig:
    """Options of the built-in QAT loop.

    Attributes:
        task: ``"classification"`` (cross-entropy on ``(inputs, labels)``) or
            ``"causal_lm"`` (next-token cross-entropy on ``input_ids`` batches).
        epochs: Passes over the data (fractions allowed; QAT needs <= 1).
        max_steps: Stop after this many optimizer steps (caps ``epochs``).
        lr: Peak learning rate (small: QAT fine-tunes).
        min_lr_ratio: The cosine ends at ``lr * min_lr_ratio``.
        warmup_steps: Linear warm-up steps before the cosine.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9, Nesterov).
        weight_decay: Weight decay (never applied to ranges, biases or norms).
        range_lr: Learned ranges (LSQ) under AdamW: Adam's step size ignores the
            gradient's scale, so each range gets its own LR, ``range_lr`` times its
            starting value (it then moves by about that fraction per step). Under
            SGD ranges share the weights' LR and LSQ's gradient scale sets their pace.
        grad_clip: Clip the gradient norm to this value.
        batch_size: Batch size per rank when the data is a Dataset (a DataLoader keeps its own).
        checkpoint_every: Write a checkpoint every N steps (and at the end).
        freeze_bn_after: Freeze all BatchNorm statistics after N steps.
        seed: Data order and initial RNG seed.
        shuffle: Shuffle the data every epoch (``seed + epoch``).
        sync_batchnorm: Under DDP on CUDA, normalize with the statistics of the
            global batch (SyncBatchNorm for the run, plain BatchNorm again after),
            so N GPUs at batch B/N train as one GPU at batch B.
        cuda_graphs: ``"auto"``: replay the training forward and backward as CUDA
            graphs when the model is on one CUDA device outside DDP (eager on the
            CPU, under DDP and when the step cannot be captured); ``"on"``: the
            same, but a model that cannot be graphed (CPU, several devices, DDP)
            is an error before any work; ``"off"``: always eager. Not part of the
            schedule: a run may resume with another value.
    """

    task: str = "classification"
    epochs: float = 1.0
    max_steps: Optional[int] = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    range_lr: float = 1e-3
    grad_clip: Optional[float] = None
    batch_size: int = 64
    checkpoint_every: Optional[int] = None
    freeze_bn_after: Optional[int] = None
    seed: int = 0
    shuffle: bool = True
    sync_batchnorm: bool = False
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        check_mode(self.cuda_graphs)
        if self.task not in TASKS:
            raise QATError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise QATError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if not (is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise QATError(f"lr must be a positive number, got {self.lr!r}")
        if not (is_number(self.epochs) and 0 < self.epochs < math.inf):
            raise QATError(f"epochs must be a finite number > 0, got {self.epochs!r}")
        # Negative values were taken as they came: a negative weight decay or range LR trains the
        # other way, a negative min_lr_ratio ends the cosine at a negative LR, a negative clip flips gradients.
        for name, ok, wanted in (("weight_decay", lambda v: v >= 0, ">= 0"), ("range_lr", lambda v: v > 0, "> 0"),
                                 ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")):
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value) and ok(value)):
                raise QATError(f"{name} must be a finite number {wanted}, got {value!r}")
        if self.grad_clip is not None and not (is_number(self.grad_clip) and 0 < self.grad_clip < math.inf):
            raise QATError(f"grad_clip must be a finite number > 0 (or None), got {self.grad_clip!r}")
        for name in ("max_steps", "checkpoint_every", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise QATError(f"{name} must be an integer >= 1, got {value!r}")
        if not is_int(self.seed):
            raise QATError(f"seed must be an integer, got {self.seed!r}")
        for name in ("warmup_steps",) + (("freeze_bn_after",) if self.freeze_bn_after is not None else ()):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise QATError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("shuffle", "sync_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise QATError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TrainProgress:
    """One report of the loop: after optimizer step ``step`` of ``total_steps``."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    seconds: float


@dataclasses.dataclass
class TrainResult:
    """What the loop did: steps run, losses (mean over ranks, one per step), checkpoint."""

    steps: int
    total_steps: int
    losses: List[float]
    seconds: float
    checkpoint: Optional[Path]
    resumed_from: Optional[int] = None
    #: How the steps ran (:meth:`quantlab.qat.loop_graphs.LoopGraphs.report`): graphs used, steps graphed/eager, why eager.
    cuda_graphs: Optional[Dict[str, Any]] = None


class EpochSampler(Sampler[int]):
    """Shuffled (``seed + epoch``), rank-sharded indices that can start mid-epoch.

    Every rank gets ``len(dataset) // world_size`` indices (the tail that does
    not divide evenly is dropped), so all ranks run the same number of steps.
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch and the first sample (per rank) to yield."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> List[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        usable = self.size - self.size % self.world_size
        return order[self.rank : usable : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(0, self.size // self.world_size - self.start)


def _dataset_and_loader_args(data: Union[Dataset, DataLoader], batch_size: int) -> tuple:
    if isinstance(data, DataLoader):
        if not hasattr(data.dataset, "__len__") or isinstance(data.dataset, torch.utils.data.IterableDataset):
            raise QATError("the QAT loop needs a map-style dataset (with len()) to shuffle, shard and resume it")
        args = dict(
            batch_size=data.batch_size or batch_size,
            collate_fn=data.collate_fn,
            num_workers=data.num_workers,
            pin_memory=data.pin_memory,
            drop_last=data.drop_last,
        )
        return data.dataset, args
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return data, dict(batch_size=batch_size)
    raise QATError(f"training data must be a Dataset or DataLoader, not {type(data).__name__}")


def cosine_schedule(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier for step ``s``: linear warm-up, then cosine from 1 to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: nn.Module, config: TrainConfig) -> List[Dict[str, Any]]:
    decay, no_decay, ranges = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("amax"):
            ranges.append(param)
        # Biases and normalization scales are not decayed (nor ranges: decay would shrink them).
        elif param.dim() <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    for param in ranges:
        lr = config.lr
        if config.optimizer == "adamw":
            lr = config.range_lr * max(float(param.detach().abs().mean()), 1e-8)
        groups.append({"params": [param], "weight_decay": 0.0, "lr": lr})
    return groups


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def compute_loss(model: nn.Module, batch: Any, task: str) -> torch.Tensor:
    """Mean training loss of one batch (already on the model's device)."""
    from quantlab.evaluation.tasks import first_tensor

    if task == "classification":
        inputs, targets = split_batch(batch)
        if targets is None:
            raise QATError("classification batches need labels: (inputs, labels) or a dict with 'labels'")
        if isinstance(inputs, dict):
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        logits = first_tensor(call_model(model, inputs))
        return F.cross_entropy(logits.float(), targets.view(-1).long())
    # Causal LM: next-token cross-entropy; padding (mask 0) and -100 labels are not scored.
    if isinstance(batch, dict):
        ids = batch["input_ids"]
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        labels = batch.get("labels", ids)
        if batch.get("attention_mask") is not None:
            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    else:
        ids = batch if isinstance(batch, torch.Tensor) else split_batch(batch)[0]
        inputs, labels = {"input_ids": ids}, ids
    logits = first_tensor(call_model(model, inputs))
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def train(
    model: nn.Module,
    data: Union[Dataset, DataLoader],
    config: Optional[TrainConfig] = None,
    *,
    checkpoint_dir: Union[str, Path, None] = None,
    resume: bool = False,
    progress: Optional[Callable[[TrainProgress], None]] = None,
) -> TrainResult:
    """Fine-tunes a prepared model (see :func:`quantlab.qat.prepare`) in place.

    Under torchrun (process group initialized) the model is wrapped in
    DistributedDataParallel, each rank trains on its shard, and rank 0 writes
    checkpoints.

    Args:
        model: The QAT model (not wrapped in DDP).
        data: Training Dataset or DataLoader (its dataset, batch size and collate
            function are used with the loop's own sampler).
        config: Loop options.
        checkpoint_dir: Folder of ``checkpoint.pt``.
        resume: Continue from ``checkpoint_dir/checkpoint.pt`` (same schedule).
        progress: Called after every step with a :class:`TrainProgress`.

    Raises:
        NonFiniteLossError: the loss became NaN/Inf (names the step, keeps the last checkpoint).
        QATError: resume without a checkpoint, or with a different schedule;
            ``cuda_graphs="on"`` for a model that cannot be graphed.
    """
    config = config or TrainConfig()
    eager_reason(model, config.cuda_graphs)  # "on" where graphs cannot run: refused before any work
    base = ddp.unwrap(model)
    device = model_device(base)
    world, rank = ddp.world_size(), ddp.rank()
    dataset, loader_args = _dataset_and_loader_args(data, config.batch_size)
    sampler = EpochSampler(len(dataset), rank=rank, world_size=world, seed=config.seed, shuffle=config.shuffle)
    # The loader gets its own generator so creating an iterator never consumes the global RNG.
    loader = DataLoader(dataset, sampler=sampler, generator=torch.Generator().manual_seed(config.seed), **loader_args)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise QATError(f"the training data has {len(dataset)} samples: too few for batch size {loader_args['batch_size']} on {world} rank(s)")
    total = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    schedule_key = {**config.to_dict(), "total_steps": total, "world_size": world, "batch_size": loader_args["batch_size"]}

    optimizer = make_optimizer(base, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total, config.warmup_steps, config.min_lr_ratio))
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    step, losses, resumed_from = 0, [], None
    if resume:
        if ckpt_path is None:
            raise QATError("resume needs a checkpoint folder")
        payload = load_checkpoint(ckpt_path, map_location=device)
        saved = payload.get("schedule")
        changed = [f for f in _SCHEDULE_FIELDS if isinstance(saved, dict) and f in saved and saved[f] != schedule_key[f]]
        if changed:
            what = ", ".join(f"{f}={saved[f]!r} (now {schedule_key[f]!r})" for f in changed)
            raise QATError(f"{ckpt_path}: cannot resume a different schedule: {what}")
        step = resumed_from = check_resume_payload(payload, ckpt_path, total)
        for what, target in (("model", base), ("optimizer", optimizer), ("scheduler", scheduler)):
            try:
                target.load_state_dict(payload[what])
            except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                detail = " ".join(str(exc).split())[:300]
                raise QATError(f"{ckpt_path}: its {what} state does not fit this run ({type(exc).__name__}: {detail})") from None
        losses = [float(v) for v in payload.get("losses", [])]  # checked: one finite number per step
        states = payload.get("rng") or []
        if len(states) == world:
            try:
                set_rng_state(states[rank])
            except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                raise QATError(f"{ckpt_path}: its RNG state of rank {rank} is damaged ({type(exc).__name__}: {str(exc)[:200]})") from None
    else:
        torch.manual_seed(config.seed + rank)

    # A 2:4-pruned model (quantlab.sparsity) keeps its pattern: after every step the pruned
    # weights are zeroed again (the mask already hides them from the forward and the gradient).
    sparse = next(iter_masks(base), None) is not None
    sync_bn = config.sync_batchnorm and ddp.is_distributed()
    if sync_bn and device.type != "cuda":
        raise QATError("sync_batchnorm needs every rank on a CUDA device (NCCL); this job runs on " + device.type)
    with synced_batchnorm(base, sync_bn), contextlib.ExitStack() as cleanup:
        train_model: nn.Module = base
        if ddp.is_distributed() and not isinstance(model, nn.parallel.DistributedDataParallel):
            ids = [device.index] if device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(base, device_ids=ids)
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            train_model = model
        if config.freeze_bn_after is not None and step >= config.freeze_bn_after:
            freeze_bn_stats(base)
        # Replays full batches' forward and backward where it can; eager otherwise (loop_graphs).
        graphs = LoopGraphs(train_model, config.cuda_graphs, batch_size=loader_args["batch_size"])
        cleanup.callback(graphs.close)  # the graphs and their memory pool are dropped when the loop ends (also on an error)

        def write_checkpoint() -> Optional[Path]:
            nonlocal last_good_step
            last_good_step = step
            states = ddp.all_gather_object(rng_state())  # collective: every rank takes part
            if ckpt_path is None or not ddp.is_main_process():
                return ckpt_path
            return save_checkpoint(ckpt_path, {
                "step": step, "total_steps": total, "schedule": schedule_key, "losses": losses,
                "model": base.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": states,
            })

        last_good = ckpt_path if (resume and ckpt_path is not None) else None
        last_good_step = step
        start_time = time.perf_counter()
        train_model.train()
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, offset * loader_args["batch_size"])
            for batch in loader:
                batch = to_device(batch, device)
                loss = compute_loss(graphs.model, batch, config.task)
                # One collective gives both the mean loss over ranks and a NaN on any rank.
                mean_loss = loss.detach().reshape(1).double()
                if ddp.is_distributed():
                    torch.distributed.all_reduce(mean_loss)
                    mean_loss /= world
                value = float(mean_loss)
                if not math.isfinite(value):
                    where = f"last good checkpoint: {last_good} (step {last_good_step})" if last_good else "no checkpoint was written yet"
                    raise NonFiniteLossError(
                        f"training loss is {value} at step {step + 1} of {total} (epoch {epoch}); "
                        f"stopped before updating the model; {where}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                del loss  # its autograd graph holds the replayed graph's buffers: gone by the loop's end (graphs.close)
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(base.parameters(), config.grad_clip)
                optimizer.step()
                if sparse:
                    reapply_masks(base)
                scheduler.step()
                step += 1
                losses.append(value)
                if config.freeze_bn_after is not None and step == config.freeze_bn_after:
                    freeze_bn_stats(base)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                    last_good = write_checkpoint()
                if progress is not None:
                    progress(TrainProgress(step, total, epoch, value, scheduler.get_last_lr()[0], time.perf_counter() - start_time))
                if step >= total:
                    break
        ddp.broadcast_buffers(base)  # BatchNorm statistics of the last step differ per rank
    if config.checkpoint_every:
        last_good = write_checkpoint()
    base.eval()
    cuda_graphs = graphs.report(step - (resumed_from or 0))
    if train_model is not base and not isinstance(model, nn.parallel.DistributedDataParallel):
        # The DDP wrapper made here sits in reference cycles: freed now, while the process group
        # lives (a reducer outliving it aborts the process at exit, see quantlab.distributed.destroy).
        del train_model, graphs
        gc.collect()
    return TrainResult(steps=step, total_steps=total, losses=losses, seconds=time.perf_counter() - start_time,
                       checkpoint=last_good, resumed_from=resumed_from, cuda_graphs=cuda_graphs)
