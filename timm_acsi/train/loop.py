"""The training loop: a run from its settings to the best epoch's metrics, on one process or many."""

import dataclasses
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..data import build_dataset, create_fer_transform
from ..metrics import compute_metrics, plot_confusion_matrix, save_metrics
from .config import TrainConfig, config_hash, save_config
from .distill import DistillationLoss, IndexedDataset, parse_teachers, teacher_log_probs
from .distributed import (
    DistInfo,
    DistributedWeightedSampler,
    all_gather,
    all_sum,
    class_balanced_weights,
    init_distributed,
    on_rank0,
    sync_buffers,
)
from .evaluation import batches, dataset_display_name, eval_loader, evaluate, resolve_layout
from .model import (
    autocast,
    check_model_source,
    create_model,
    create_optimizer_and_scheduler,
    load_scheduler_state,
    scheduler_state,
)
from .run_folder import (
    ResumePoint,
    RunFolderLock,
    clear_run_dir,
    load_resume_point,
    log_config_changes,
    prepare_run_dir,
    rng_state,
    save_resume_state,
    seed_everything,
    set_rng_state,
    write_log,
)

__all__ = ["train"]

_logger = logging.getLogger(__name__)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Train ``cfg`` and return the metrics of the best epoch on the validation split (``metrics.json``).

    Args:
        cfg: the run's settings.
        resume: continue the run in ``cfg.output`` from its last completed epoch, exactly as if it had
            not stopped (same batches, augmentations and optimizer state). Settings that differ from the
            run's ``config.yaml`` (logged) apply from there on: the lr schedule and the optimizer's
            hyper-parameters are those of ``cfg``, e.g. a longer ``epochs`` stretches a cosine schedule. The
            model (architecture, classes, model_args) cannot change, nor ``epochs`` drop below the epochs done.
        overwrite: replace the run files of an existing folder (otherwise it is refused).
        progress: show progress bars (rank 0 only).

    Raises:
        FileExistsError / FileNotFoundError / ValueError (single process) or RunError (all ranks of a
        distributed run) for an occupied run folder, missing data, a damaged resume state or an invalid setting;
        ValueError on every rank when the training diverges (a non-finite loss: nothing of that epoch is kept).
    """
    if not cfg.data:
        raise ValueError("No dataset: set data to the dataset root (--data ROOT).")
    check_model_source(cfg)
    owns_group = dist.is_available() and not dist.is_initialized()
    info = init_distributed(cfg.device)
    was_deterministic, was_benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        return _train(cfg, info, resume, overwrite, progress)
    finally:  # leave the process's global settings (and process group) as they were
        torch.use_deterministic_algorithms(was_deterministic)
        torch.backends.cudnn.benchmark = was_benchmark
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Data:
    """The datasets and loaders of a run."""

    train_loader: DataLoader
    val_loader: DataLoader
    label_names: Tuple[str, ...]
    val_split: str
    name: str
    train_set: Any  # the training faces without the loader's wrapping, for the teachers
    eval_transform: Any

    @property
    def sampler(self) -> Sampler:
        return self.train_loader.sampler


@dataclass
class _State:
    """What the loop carries from epoch to epoch (and what a resume restores)."""

    epoch: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    best_weights: Optional[Dict[str, torch.Tensor]] = None
    log: List[Dict[str, Any]] = field(default_factory=list)


def _train(cfg: TrainConfig, info: DistInfo, resume: bool, overwrite: bool, progress: bool) -> Dict[str, Any]:
    with RunFolderLock() as lock:  # held by rank 0, the process that writes the folder
        return _train_locked(cfg, info, resume, overwrite, progress, lock)


def _train_locked(
    cfg: TrainConfig, info: DistInfo, resume: bool, overwrite: bool, progress: bool, lock: RunFolderLock
) -> Dict[str, Any]:
    run_dir, point = on_rank0(lambda: _open_run(cfg, resume, overwrite, lock), info)
    cfg = dataclasses.replace(cfg, output=str(run_dir))
    data = _load_data(cfg, info)
    seed_everything(cfg.seed)  # same initial weights on every rank
    model = create_model(cfg, data.label_names).to(info.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    updates_per_epoch = math.ceil(len(data.train_loader) / cfg.accum_steps)
    optimizer, scheduler = create_optimizer_and_scheduler(model, cfg, updates_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp and info.device.type == "cuda")
    # before the reseed, so that a teacher leaves the augmentation stream as it was
    criterion = _criterion(cfg, data, info, progress)
    seed_everything(cfg.seed + info.rank)  # distinct augmentation streams per rank
    state = _State() if point is None else _restore(point, cfg, info, model, optimizer, scheduler, scaler)
    ema = _create_ema(cfg, model, point, info)
    eval_model = ema.module if ema is not None else model  # what is validated, selected and saved
    if info.is_main:
        _logger.info(
            f"Training {cfg.model} on {data.name} ({len(data.train_loader.dataset)} train / "
            f"{len(data.val_loader.dataset)} {data.val_split} images, {cfg.num_classes} classes) on "
            f"{info.world_size} x {info.device} -> {run_dir}"
        )
    train_model = model
    if info.distributed:
        device_ids = [info.device] if info.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:  # only the training forward + backward; state dicts, validation and checkpoints use `model`
        train_model = torch.compile(train_model)
    meta_base = _checkpoint_description(cfg, data)
    for epoch in range(state.epoch, cfg.epochs):
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        if scheduler is not None:
            scheduler.step_update(epoch * updates_per_epoch)
        data.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = _train_one_epoch(
            train_model, data.train_loader, criterion, optimizer, scaler, cfg, info, desc,
            progress and info.is_main, scheduler, epoch * updates_per_epoch, ema,
        )  # fmt: skip
        sync_buffers(model, info)
        if ema is not None:
            sync_buffers(ema.module, info)
        entry = _validate(eval_model, cfg, info, data, epoch, stats, t0)
        if scheduler is not None:
            scheduler.step(epoch + 1, entry[cfg.best_metric])  # epoch-stepped schedulers (plateau) only
        improved = _record(state, entry, cfg.best_metric, eval_model)
        rng = all_gather(rng_state(info.device), info)
        if info.is_main:
            if point is None and epoch == 0:  # the first epoch of a new run: only now is the folder replaced
                run_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire(run_dir)  # before anything in it is removed
                clear_run_dir(run_dir)
            _commit_epoch(
                run_dir, cfg, state, entry, improved, meta_base, model, ema, optimizer, scheduler, scaler, rng
            )
            _log_epoch(desc, entry, data.val_split, improved)
    return _finish(eval_model, cfg, info, data, state, run_dir)


def _open_run(
    cfg: TrainConfig, resume: bool, overwrite: bool, lock: RunFolderLock
) -> Tuple[Path, Optional[ResumePoint]]:
    """The run folder, checked and locked if it exists (and its last completed epoch when resuming): rank 0's
    decision."""
    output = cfg.output or f"runs/{cfg.architecture}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = prepare_run_dir(output, overwrite=overwrite, resume=resume, create=False)
    lock.acquire(run_dir)
    return run_dir, load_resume_point(run_dir, cfg) if resume else None


def _load_data(cfg: TrainConfig, info: DistInfo) -> _Data:
    """Train and validation sets with their transforms, sampler and loaders; classes without images raise."""
    layout = resolve_layout(cfg.data, cfg.layout)
    if layout == "fer2013" and not cfg.grayscale and info.is_main:
        _logger.warning(
            "FER-2013's faces are grayscale, but this run does not say so: pass --grayscale (grayscale: true in a "
            "config) so that the checkpoint records it and evaluate, predict and export feed the model grayscale "
            "faces; without it they feed colour photos to a model that has only seen gray ones."
        )
    val_split = cfg.val_split or ("test" if layout == "rafdb" else "val")
    common = dict(img_size=cfg.img_size, resize=cfg.resize, grayscale=cfg.grayscale)
    train_tf = create_fer_transform(
        True, **common, train_crops=cfg.train_crops, scale=cfg.scale, color_jitter=cfg.color_jitter, re_prob=cfg.re_prob
    )
    eval_tf = create_fer_transform(False, **common)
    train_set = build_dataset(cfg.data, "train", layout, cfg.num_classes, train_tf, cfg.skip_unreadable)
    val_set = build_dataset(cfg.data, val_split, layout, cfg.num_classes, eval_tf, cfg.skip_unreadable)
    label_names = tuple(train_set.label_names)
    if tuple(val_set.label_names) != label_names:
        raise ValueError(f"Train labels {label_names} and {val_split} labels {val_set.label_names} differ.")
    _check_class_counts(train_set, val_set, val_split, cfg)
    if cfg.balanced:
        weights = class_balanced_weights(train_set.targets, cfg.num_classes)
        sampler = DistributedWeightedSampler(weights, len(train_set), info.world_size, info.rank, seed=cfg.seed)
    else:
        sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(
        IndexedDataset(train_set) if cfg.teacher else train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"{len(sampler)} training images per process is less than one batch of {cfg.batch_size}: "
            "lower --batch-size."
        )
    val_loader = eval_loader(val_set, cfg.batch_size, cfg.workers, info)
    name = dataset_display_name(cfg.data, layout, cfg.dataset_name)
    return _Data(train_loader, val_loader, label_names, val_split, name, train_set, eval_tf)


def _criterion(cfg: TrainConfig, data: _Data, info: DistInfo, progress: bool) -> nn.Module:
    """Cross-entropy on the labels; with a teacher, the distillation loss against its soft targets."""
    if not cfg.teacher:
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    targets = teacher_log_probs(
        parse_teachers(cfg.teacher), data.train_set, data.eval_transform, cfg.img_size, cfg.img_size / cfg.resize,
        cfg.grayscale, info,
        cfg.batch_size, cfg.workers, progress=progress and info.is_main, log=info.is_main,
    )  # fmt: skip
    return DistillationLoss(targets, cfg.distill_alpha, cfg.distill_temperature, cfg.label_smoothing).to(info.device)


def _check_class_counts(train_set, val_set, val_split: str, cfg: TrainConfig) -> None:
    """A class without training images can never be predicted: refuse it; one without validation images only
    leaves its accuracy undefined: warn."""
    names = train_set.label_names
    no_train = [n for n, c in zip(names, train_set.class_counts()) if c == 0]
    if no_train:
        hint = " Pass --num-classes 7 (FER-7 has no contempt)." if no_train == ["contempt"] else ""
        raise ValueError(
            f"{cfg.data}: no training images of class(es) {', '.join(no_train)} ({len(names)} classes asked for)."
            f"{hint} Add their images under train/, or train on a dataset that has every class."
        )
    no_val = [n for n, c in zip(names, val_set.class_counts()) if c == 0]
    if no_val:
        _logger.warning(
            f"{cfg.data}: the {val_split} split has no images of {', '.join(no_val)}: their accuracy (and the "
            "mean-class accuracy) is left out of the validation metrics."
        )


def _restore(point: ResumePoint, cfg: TrainConfig, info: DistInfo, model, optimizer, scheduler, scaler) -> _State:
    """Model, optimizer buffers, scaler and RNG streams of the resumed epoch; the loop's state."""
    state = point.state
    model.load_state_dict(state["model"])
    # Optimizer: the saved buffers (momentum...), with cfg's hyper-parameters. Scheduler: rebuilt from cfg
    # (timm's schedules are functions of their arguments and the step; a saved one would bring back the old
    # epochs, decay...). A plateau schedule is the exception: its lr is not a function of the step but where its
    # decays have brought it, so the saved lr and plateau state (best metric, patience and cooldown counters) carry
    # over.
    plateau = cfg.sched == "plateau" and state.get("sched") == "plateau"
    kept = ("params", "lr") if plateau else ("params",)
    hyper = [{k: v for k, v in group.items() if k not in kept} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)
    if plateau:
        load_scheduler_state(scheduler, state["scheduler"])
    restore_scaler(scaler, state.get("scaler"))
    rng = state["rng"]
    if len(rng) == info.world_size:
        set_rng_state(rng[info.rank], info.device)
    elif info.is_main:
        _logger.warning(f"Resuming on {info.world_size} processes, saved on {len(rng)}: RNG streams restart.")
    if info.is_main:
        log_config_changes(cfg, Path(cfg.output) / "config.yaml")
        _logger.info(f"Resuming {cfg.output} after epoch {point.epoch}/{cfg.epochs}.")
    return _State(point.epoch, point.best, point.best_epoch, point.best_weights, point.log)


def _create_ema(
    cfg: TrainConfig, model: nn.Module, point: Optional[ResumePoint], info: DistInfo
) -> Optional[ModelEmaV3]:
    """The moving average of ``model``'s weights if ``cfg.model_ema``: resumed from the run's saved average, or
    started from the model's current weights (a new run, or a run that kept no average until now)."""
    if not cfg.model_ema:
        return None
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    saved = point.state.get("model_ema") if point is not None else None
    if saved is not None:
        ema.module.load_state_dict(saved)
    elif point is not None and info.is_main:
        _logger.warning(f"{cfg.output} kept no weight average until epoch {point.epoch}: it starts from its weights.")
    return ema


def restore_scaler(scaler: torch.amp.GradScaler, saved: Optional[Dict[str, Any]]) -> None:
    """Load a saved GradScaler state into an enabled scaler. A run saved without AMP (or on the CPU) saved an
    empty state: the scaler then starts afresh, as settings changed on resume apply from there on."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)


def _checkpoint_description(cfg: TrainConfig, data: _Data) -> Dict[str, Any]:
    """What every checkpoint of the run records about itself (evaluate, publish and the predictor read it)."""
    return {
        "architecture": cfg.architecture,
        "num_classes": cfg.num_classes,
        "label_names": list(data.label_names),
        "model_args": dict(cfg.model_args),
        "input_size": [3, cfg.img_size, cfg.img_size],
        "crop_pct": cfg.img_size / cfg.resize,
        "grayscale": cfg.grayscale,
        "config_hash": config_hash(cfg),
        "dataset": data.name,
        **({"teacher": parse_teachers(cfg.teacher)} if cfg.teacher else {}),
    }


def _validate(
    model: nn.Module, cfg: TrainConfig, info: DistInfo, data: _Data, epoch: int, stats: Dict[str, float], t0: float
) -> Dict[str, Any]:
    """The epoch's log entry: training statistics and validation metrics; a non-finite loss raises."""
    cm, val_loss = evaluate(
        model, data.val_loader, cfg.num_classes, info, cfg.amp, channels_last=cfg.channels_last, progress=False
    )
    val = compute_metrics(cm, data.label_names)
    entry = {
        "epoch": epoch + 1,
        "lr": stats["lr"],
        "train_loss": stats["train_loss"],
        "train_acc": stats["train_acc"],
        "val_loss": val_loss,
        "val_acc": val["accuracy"],
        "val_mean_class_acc": val["mean_class_accuracy"],
        "images_per_s": stats["images_per_s"],
        "time": time.perf_counter() - t0,
    }
    if not (math.isfinite(entry["train_loss"]) and math.isfinite(val_loss)):
        kept = (
            "Nothing was saved: run it again"
            if epoch == 0
            else f"The run keeps epoch {epoch}: continue it with --resume"
        )
        raise ValueError(
            f"Training diverged in epoch {epoch + 1}: train loss {entry['train_loss']}, {data.val_split} loss "
            f"{val_loss} (lr {cfg.lr}). Nothing of this epoch is kept. {kept} and a lower --lr (or --warmup-epochs)."
        )
    return entry


def _record(state: _State, entry: Dict[str, Any], metric: str, model: nn.Module) -> bool:
    """Add the epoch to the state; whether it is the best so far (a non-finite metric never is)."""
    state.epoch = entry["epoch"]
    state.log.append(entry)
    value = entry[metric]
    if not (isinstance(value, float) and math.isfinite(value) and value > state.best):
        return False
    state.best, state.best_epoch = value, entry["epoch"]
    state.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return True


def _commit_epoch(
    run_dir: Path,
    cfg: TrainConfig,
    state: _State,
    entry: Dict[str, Any],
    improved: bool,
    meta_base: Dict[str, Any],
    model: nn.Module,
    ema: Optional[ModelEmaV3],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    rng: List[Dict[str, Any]],
) -> None:
    """Write the epoch: log, config, checkpoints, then the resume state, which is the commit point (see
    :func:`~timm_acsi.train.run_folder.load_resume_point` for a kill between these writes). With a weight
    average, the checkpoints hold the average and the resume state both."""
    write_log(run_dir / "log.jsonl", state.log)
    save_config(cfg, run_dir / "config.yaml")
    meta = {**meta_base, "epoch": state.epoch, "metric": {"name": cfg.best_metric, "value": entry[cfg.best_metric]}}
    if improved:
        save_checkpoint(run_dir / "best.safetensors", state.best_weights, meta)
    save_checkpoint(run_dir / "last.safetensors", (ema.module if ema is not None else model).state_dict(), meta)
    resume_state = {
        "epoch": state.epoch,
        "best": state.best,
        "best_epoch": state.best_epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "sched": cfg.sched,
        "scheduler": scheduler_state(scheduler),
        "scaler": scaler.state_dict(),
        "rng": rng,
        **({"model_ema": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}} if ema is not None else {}),
    }
    save_resume_state(run_dir / "last_state.pt", resume_state)


def _log_epoch(desc: str, entry: Dict[str, Any], val_split: str, improved: bool) -> None:
    _logger.info(
        f"{desc}: lr {entry['lr']:.2e} | train loss {entry['train_loss']:.4f} acc {100 * entry['train_acc']:.2f}% | "
        f"{val_split} loss {entry['val_loss']:.4f} acc {100 * entry['val_acc']:.2f}% mean-class "
        f"{100 * entry['val_mean_class_acc']:.2f}% | {entry['images_per_s']:.0f} img/s, {entry['time']:.1f}s"
        + (" *" if improved else "")
    )


def _finish(model: nn.Module, cfg: TrainConfig, info: DistInfo, data: _Data, state: _State, run_dir: Path):
    """The best epoch evaluated on the validation split: ``metrics.json`` and the confusion-matrix plot."""
    model.load_state_dict(state.best_weights)
    cm, _ = evaluate(model, data.val_loader, cfg.num_classes, info, cfg.amp, channels_last=cfg.channels_last)
    metrics = compute_metrics(cm, data.label_names, data.name, data.val_split)
    if info.is_main:
        save_metrics(run_dir / "metrics.json", metrics)
        title = f"{cfg.architecture} on {data.name} {data.val_split}, epoch {state.best_epoch}"
        plot_confusion_matrix(cm, data.label_names, run_dir / "confusion_matrix.png", title=title)
        _logger.info(
            f"Best epoch {state.best_epoch}: {data.val_split} accuracy {100 * metrics['accuracy']:.2f}%, mean-class "
            f"{100 * metrics['mean_class_accuracy']:.2f}% -> {run_dir / 'best.safetensors'}"
        )
    return metrics


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    info: DistInfo,
    desc: str,
    progress: bool,
    scheduler: Any = None,
    num_updates: int = 0,
    ema: Optional[ModelEmaV3] = None,
) -> Dict[str, float]:
    """One pass over ``loader``; returns loss, accuracy, images/s over all ranks and the mean lr of its updates.

    After each optimizer update the scheduler sets the lr of the next (``step_update``, as timm's train.py) and
    ``ema`` (if any) takes in the new weights.
    Loss and accuracy accumulate on the device: the host waits for the device only when the progress bar
    redraws and at the end of the epoch, not at every batch.
    """
    model.train()
    num_batches = len(loader)
    loss_sum = torch.zeros((), device=info.device)
    correct = torch.zeros((), dtype=torch.int64, device=info.device)
    count, lrs = 0, []
    total = num_batches * cfg.batch_size * info.world_size
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress, leave=False)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y, *index) in enumerate(batches(loader)):  # index: the samples' positions, for soft targets
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        group_start = (i // cfg.accum_steps) * cfg.accum_steps
        group_size = min(cfg.accum_steps, num_batches - group_start)
        step_now = i + 1 == group_start + group_size
        sync = model.no_sync() if info.distributed and not step_now else nullcontext()
        with sync:
            with autocast(info.device, cfg.amp):
                logits = model(x)
                loss = criterion(logits, y, *index)
            scaler.scale(loss / group_size).backward()
        if step_now:
            lrs.append(optimizer.param_groups[0]["lr"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        count += len(y)
        if bar.update(len(y) * info.world_size):  # True when the bar redrew (never when disabled)
            bar.set_postfix(loss=f"{float(loss_sum) / count:.4f}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(count, dtype=torch.float64)])
    totals = all_sum(totals.cpu(), info)
    return {
        "train_loss": float(totals[0] / totals[2]),
        "train_acc": float(totals[1] / totals[2]),
        "images_per_s": float(totals[2]) / elapsed,
        "lr": sum(lrs) / len(lrs),
    }
