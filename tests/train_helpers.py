"""Shared steps of the training tests."""

import dataclasses

import pytest

from timm_acsi.train import TrainConfig, train
from timm_acsi.train import loop as train_loop


def train_killed_in_epoch_2(cfg: TrainConfig, output) -> None:
    """Run ``cfg`` into ``output`` and kill it (KeyboardInterrupt) during its second epoch: epoch 1 is committed."""
    calls, real = [], train_loop._train_one_epoch

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_loop, "_train_one_epoch", dies_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            train(dataclasses.replace(cfg, output=str(output)), progress=False)
