"""elf-dd: ELF (EvaLuation with distillation Feature) for dataset distillation.

Public API::

    from elf import ELFTrainer, FeatureBank, split_model, list_split_points, ConvNet, create_model
"""

from .augment import DSA, DSAParams
from .checkpoint import load_checkpoint, save_checkpoint
from .dc_augment import DCAugment
from .errors import DivergedError, ELFError
from .feature_bank import FeatureBank
from .losses import DISTANCES, feature_distance
from .models import AlexNet, ConvNet, ResNet, VGG, create_model, default_split_point, list_models, register_model
from .protocol import PROTOCOLS, Protocol, get_protocol
from .split import SplitModules, SplitOptions, SplitPoint, list_split_points, split_model
from .trainer import Callback, ELFTrainer, EvalResult
from .version import __version__

__all__ = [
    "AlexNet",
    "Callback",
    "ConvNet",
    "DISTANCES",
    "DSA",
    "DCAugment",
    "DSAParams",
    "ELFError",
    "DivergedError",
    "ELFTrainer",
    "EvalResult",
    "FeatureBank",
    "PROTOCOLS",
    "Protocol",
    "ResNet",
    "SplitModules",
    "SplitOptions",
    "SplitPoint",
    "VGG",
    "__version__",
    "create_model",
    "default_split_point",
    "feature_distance",
    "get_protocol",
    "list_models",
    "list_split_points",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
    "split_model",
]
