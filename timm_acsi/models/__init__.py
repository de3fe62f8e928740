from .coresnet import CoResNet

__all__ = ["CoResNet"]
