"""Training and evaluation of FER models with the paper's recipe (Sec. 4.2), on one process or many (DDP).

A run lives in one folder::

    runs/NAME/
        config.yaml             every setting of the run (reload it with ``--config``)
        log.jsonl               one JSON object per epoch (``lr``: the mean lr of the epoch's optimizer updates)
        last.safetensors/.json  weights + description of the last epoch
        last_state.pt           resume state: model, optimizer, scheduler, scaler, RNG states, best metric
        best.safetensors/.json  weights + description of the best epoch
        metrics.json            best epoch evaluated on the validation split (schema: :mod:`timm_acsi.metrics`)
        confusion_matrix.png

Nothing is written into the folder before the first epoch completes. The resume state holds only tensors and
plain Python values, written with ``torch.save`` and read back with ``torch.load(weights_only=True)``: nothing
is unpickled. That keeps the optimizer's nested state dict as it is, where safetensors would need it flattened
and rebuilt. Each epoch writes ``log.jsonl`` and ``config.yaml``, ``best.safetensors`` (if improved), then
``last.safetensors``, then ``last_state.pt``: the resume state is the commit point, and it carries its own copy
of the model weights, so a run killed between two writes resumes from a consistent epoch.

The lr schedule advances after every optimizer update (timm's ``step_update``): warm-up and cosine move within
epochs, a step decay falls on epoch boundaries. Distributed runs are launched by ``torchrun`` (it sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); each process trains on its shard, validation covers every image
exactly once (unpadded shards, confusion matrices summed across processes) and only rank 0 prints and writes.

Modules: :mod:`.config` (settings), :mod:`.distributed` (processes and samplers), :mod:`.run_folder` (run
folder and resume state), :mod:`.model` (model, optimizer, schedule), :mod:`.distill` (teachers' soft targets),
:mod:`.evaluation`, :mod:`.loop`.
"""

from .config import TrainConfig, config_from_dict, config_hash, load_config_file, save_config
from .distributed import (
    DistInfo,
    DistributedWeightedSampler,
    RunError,
    ShardSampler,
    class_balanced_weights,
    init_distributed,
)
from .evaluation import evaluate, evaluate_checkpoint
from .loop import train
from .model import create_model, create_optimizer_and_scheduler
from .run_folder import RUN_FILES, prepare_run_dir

__all__ = [
    "TrainConfig",
    "config_from_dict",
    "load_config_file",
    "save_config",
    "config_hash",
    "DistInfo",
    "RunError",
    "init_distributed",
    "DistributedWeightedSampler",
    "ShardSampler",
    "prepare_run_dir",
    "create_model",
    "create_optimizer_and_scheduler",
    "class_balanced_weights",
    "evaluate",
    "evaluate_checkpoint",
    "train",
    "RUN_FILES",
]
