"""Numbers published in the JTDS paper (Chen et al., ICML 2022), quoted table by table.

Quotations only, never auxnb results. Figure 2 (accuracy against the corruption ratio on CUB) is
printed as a plot without numbers; Table 4 gives STL and JTDS at corruption ratios 0.2/0.4/0.6.
"""

from __future__ import annotations

__all__ = ["TABLES"]

_SOURCE = "Chen et al., ICML 2022 (JTDS)"

TABLES: dict[str, dict] = {
    "table2": {
        "caption": (
            "JTDS Table 2: fully supervised setting. Accuracy (%) on CUB, Pet, CIFAR10, CIFAR100; "
            "RMSE on MovieLens-1M (lower is better). Mean of 3 seeds."
        ),
        "source": _SOURCE,
        "columns": ["method", "CUB", "Pet", "CIFAR10", "CIFAR100", "ML-1M RMSE"],
        "rows": [
            {"method": "STL", "CUB": 73.86, "Pet": 61.45, "CIFAR10": 71.60, "CIFAR100": 74.14, "ML-1M RMSE": 0.9112},
            {"method": "NAL", "CUB": 73.42, "Pet": 66.09, "CIFAR10": 70.42, "CIFAR100": 73.38, "ML-1M RMSE": 0.9101},
            {"method": "Uncertainty", "CUB": 72.54, "Pet": 67.14, "CIFAR10": 70.93, "CIFAR100": 68.10, "ML-1M RMSE": 0.9103},
            {"method": "GCS", "CUB": 73.70, "Pet": 66.30, "CIFAR10": 70.64, "CIFAR100": 74.14, "ML-1M RMSE": 0.9098},
            {"method": "AuxL", "CUB": 74.32, "Pet": 66.30, "CIFAR10": 71.23, "CIFAR100": 73.80, "ML-1M RMSE": 0.9097},
            {"method": "N-JTDS", "CUB": 71.38, "Pet": 67.28, "CIFAR10": 70.57, "CIFAR100": 75.06, "ML-1M RMSE": 0.9181},
            {"method": "JTDS", "CUB": 77.04, "Pet": 70.01, "CIFAR10": 72.59, "CIFAR100": 75.68, "ML-1M RMSE": 0.9087},
        ],
    },
    "table3": {
        "caption": "JTDS Table 3: semi-supervised setting (20% of the primary labels). Accuracy (%), mean of 3 seeds.",
        "source": _SOURCE,
        "columns": ["method", "CUB", "Pet", "CIFAR100"],
        "rows": [
            {"method": "STL", "CUB": 38.35, "Pet": 30.21, "CIFAR100": 55.16},
            {"method": "NAL", "CUB": 48.15, "Pet": 38.00, "CIFAR100": 57.52},
            {"method": "Uncertainty", "CUB": 46.66, "Pet": 43.57, "CIFAR100": 57.70},
            {"method": "GCS", "CUB": 46.50, "Pet": 36.80, "CIFAR100": 55.66},
            {"method": "AuxL", "CUB": 50.19, "Pet": 36.42, "CIFAR100": 55.94},
            {"method": "N-JTDS", "CUB": 46.50, "Pet": 45.53, "CIFAR100": 57.54},
            {"method": "JTDS", "CUB": 51.21, "Pet": 53.49, "CIFAR100": 58.56},
        ],
    },
    "table4": {
        "caption": (
            "JTDS Table 4: CUB accuracy (%) of the scheduler's ablations in the full, semi-supervised and "
            "corrupted-label settings (corruption ratio 0.2 / 0.4 / 0.6)."
        ),
        "source": _SOURCE,
        "columns": ["method", "full", "semi", "corrupted 0.2", "corrupted 0.4", "corrupted 0.6"],
        "rows": [
            {"method": "STL", "full": 73.86, "semi": 38.35, "corrupted 0.2": 65.89, "corrupted 0.4": 54.94, "corrupted 0.6": 36.91},
            {"method": "only task", "full": 72.90, "semi": 39.97, "corrupted 0.2": 65.93, "corrupted 0.4": 54.82, "corrupted 0.6": 40.95},
            {"method": "w/o loss", "full": 76.33, "semi": 49.23, "corrupted 0.2": 67.24, "corrupted 0.4": 57.82, "corrupted 0.6": 44.24},
            {"method": "w/o feature", "full": 73.97, "semi": 44.63, "corrupted 0.2": 67.14, "corrupted 0.4": 59.79, "corrupted 0.6": 47.15},
            {"method": "w/o aux", "full": 75.47, "semi": 38.44, "corrupted 0.2": 70.18, "corrupted 0.4": 61.84, "corrupted 0.6": 39.65},
            {"method": "JTDS", "full": 77.04, "semi": 51.21, "corrupted 0.2": 72.77, "corrupted 0.4": 65.98, "corrupted 0.6": 50.70},
        ],
    },
}
