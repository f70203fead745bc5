"""oni: Optimal Noise Injection against membership inference, with fast Shapley kernels."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ops, distributed, reference  # noqa: F401
from .attacks import ATTACKS, AttackResult, run_attack, run_attacks
from .data import (
    DataError,
    Dataset,
    Splits,
    from_arrays,
    load_dataset,
    load_npz,
    load_shokri_csv,
    load_texas,
    make_splits,
    save_npz,
    synthetic_purchase,
)
from .defenses import (
    DEFAULTS,
    DEFENSES,
    DefendedModel,
    DynaNoise,
    defend,
    defense_config,
    distillation_loss,
    load_defended,
    save_defended,
)
from .noise import (
    NoiseResult,
    noise_budget,
    optimal_noise,
    robustness_radius,
    uniform_noise,
)
from .shapley import (
    ShapleyResult,
    ShapleyValueSampling,
    build_info,
    exact_shapley,
    shapley_values,
)

__all__ = [
    "ATTACKS",
    "AttackResult",
    "run_attack",
    "run_attacks",
    "DataError",
    "Dataset",
    "Splits",
    "from_arrays",
    "load_dataset",
    "load_npz",
    "load_shokri_csv",
    "load_texas",
    "make_splits",
    "save_npz",
    "synthetic_purchase",
    "DEFAULTS",
    "DEFENSES",
    "DefendedModel",
    "DynaNoise",
    "defend",
    "defense_config",
    "distillation_loss",
    "load_defended",
    "save_defended",
    "NoiseResult",
    "noise_budget",
    "optimal_noise",
    "robustness_radius",
    "uniform_noise",
    "ShapleyResult",
    "ShapleyValueSampling",
    "build_info",
    "exact_shapley",
    "shapley_values",
]
__version__ = "0.1.0"
