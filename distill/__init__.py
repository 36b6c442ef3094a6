"""gtnkit's core: data sets, the student zoo, the one training/evaluation loop, augmentation,
explicit randomness and atomic result files, and dataset condensation (the one meta-training
loop with its interchangeable meta-gradient strategies). Nothing here imports ``selection`` or
``gtn``."""

from . import kip as _kip  # noqa: E402,F401 - registers the "kip" strategy (KIP, ICLR 2021)
from . import trajectory as _trajectory  # noqa: E402,F401 - registers "trajectory" (MTT)
from .condense import condense, condense_config
from .data import DATASETS, DataError, DatasetInfo, ImageSet, get_info, load_dataset
from .devices import DeviceError, resolve_device
from .engine import (
                     EvalProtocol,
                     EvalResult,
                     TrainConfig,
                     accuracy,
                     evaluate_set,
                     mean_std,
                     predict,
                     train,
)
from .exports import EXPORT_FORMATS, export_set
from .labelsolve import solve_labels
from .metatrain import CheckpointError, MetaConfig, MetaResult, meta_train
from .methods import METHODS, Method
from .models import ModelError, available_models, build_model, parse_model_spec
from .rng import child_seed, generator
from .store import SavedSet, StoreError, load_set, save_set
from .strategies import ConfigError, NonFiniteError, RealSampler, StrategyConfig, make_strategy
from .synthetic import SyntheticSet
from .teacher import Teacher

__all__ = [
    "DATASETS", "DataError", "DatasetInfo", "ImageSet", "get_info", "load_dataset",
    "DeviceError", "resolve_device",
    "EvalProtocol", "EvalResult", "TrainConfig", "accuracy", "evaluate_set", "mean_std",
    "predict", "train",
    "ModelError", "available_models", "build_model", "parse_model_spec",
    "child_seed", "generator",
    "SavedSet", "StoreError", "load_set", "save_set", "EXPORT_FORMATS", "export_set",
    "CheckpointError", "MetaConfig", "MetaResult", "condense", "condense_config", "meta_train",
    "ConfigError", "NonFiniteError", "RealSampler", "StrategyConfig", "make_strategy",
    "SyntheticSet", "Teacher", "METHODS", "Method", "solve_labels",
]
