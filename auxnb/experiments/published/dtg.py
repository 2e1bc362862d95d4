"""DTG-AuxL (Chen et al., NeurIPS 2023) as published: Tables 1, 2, 4, 5 and 6, quoted, never recomputed.

Each value is the paper's mean over 5 seeds; the column ``"<column> ±"`` holds its standard
deviation. Accuracy in percent (higher is better), RMSE for Toys / Movies (lower is better);
None where the paper prints "-" (a method that cannot run there).
"""

from __future__ import annotations

__all__ = ["TABLES"]

_SOURCE = "Chen et al., Joint Data-Task Generation for Auxiliary Learning, NeurIPS 2023"


def _rows(columns: list[str], data: dict[str, list[tuple[float, float] | None]]) -> list[dict]:
    rows = []
    for method, values in data.items():
        row: dict = {"method": method}
        for col, value in zip(columns, values):
            row[col], row[f"{col} ±"] = (None, None) if value is None else value
        rows.append(row)
    return rows


_T1_COLS = ["CUB ResNet18", "CUB ResNet50", "CIFAR100 ConvNet", "CIFAR100 ResNet18", "Toys RMSE", "Movies RMSE",
            "CIFAR10-100 ConvNet", "Pet-CUB ResNet18"]
_T1 = {
    "STL": [(76.16, 0.70), (80.46, 0.42), (50.35, 0.50), (55.79, 0.22), (0.9188, 0.0005), (1.0456, 0.0008), (79.35, 0.41), (69.47, 0.16)],
    "Equal": [(74.25, 0.17), (78.28, 0.23), (49.56, 0.31), (56.42, 0.05), (0.9213, 0.0004), (1.0459, 0.0009), (78.99, 0.42), (67.15, 0.41)],
    "Uncert": [(73.94, 0.20), (77.03, 0.24), (48.90, 0.10), (56.95, 0.31), (0.9171, 0.0009), (1.0495, 0.0018), (80.13, 0.17), (63.58, 0.13)],
    "GCS": [(74.11, 0.29), (78.54, 0.54), (49.20, 0.35), (56.57, 0.21), (0.9224, 0.0003), (1.0459, 0.0018), (79.59, 0.52), (67.31, 0.89)],
    "AuxL": [(75.39, 0.59), (78.00, 0.55), (49.39, 0.82), (57.14, 0.25), (0.9186, 0.0005), (1.0483, 0.0019), (79.69, 0.41), (66.17, 0.37)],
    "JTDS": [(76.50, 0.47), (79.34, 0.19), (49.00, 0.33), (57.28, 0.20), (0.9187, 0.0004), (1.0504, 0.0023), None, None],
    "MAXL": [(75.79, 0.45), (78.48, 0.88), (49.71, 0.37), (56.32, 0.23), None, None, (80.02, 0.51), (68.48, 0.85)],
    "DTG-AuxL": [(77.75, 0.27), (81.73, 0.20), (50.94, 0.05), (57.84, 0.20), (0.9153, 0.0004), (1.0426, 0.0009), (80.64, 0.12), (70.48, 0.28)],
}

_T2_COLS = ["5 shot", "10 shot"]
_T2 = {
    "STL": [(44.99, 1.15), (63.25, 0.68)],
    "Equal": [(45.37, 0.61), (60.58, 0.81)],
    "Uncert": [(45.63, 0.08), (59.30, 0.55)],
    "GCS": [(45.68, 0.67), (60.81, 0.74)],
    "AuxL": [(45.07, 1.31), (63.79, 0.11)],
    "JTDS": [(46.13, 0.89), (63.39, 0.18)],
    "MAXL": [(45.47, 1.06), (61.70, 0.10)],
    "DTG-AuxL": [(52.33, 1.36), (67.68, 0.33)],
}

_T4_COLS = ["CUB ResNet50", "Pet-CUB ResNet18", "Toys RMSE"]
_T4 = {
    "w/o F-nonlinear": [(81.22, 0.27), (67.76, 0.17), (0.9195, 0.0021)],
    "w/o L-nonlinear": [(80.96, 0.37), (66.58, 1.12), (0.9213, 0.0026)],
    "w/o L-bias": [(79.28, 0.34), (69.36, 0.37), (0.9204, 0.0011)],
    "w/o bi-level": [(80.32, 0.42), (68.53, 0.49), (0.9163, 0.0008)],
    "w/o instance reg": [(80.44, 0.34), (67.53, 0.95), (0.9174, 0.0012)],
    "complete": [(81.73, 0.20), (70.48, 0.28), (0.9153, 0.0004)],
}

_T5_COLS = ["CUB ResNet18", "Movies RMSE"]
_T5 = {
    "MixUp": [(75.88, 0.50), None],
    "Auto-Mix": [(76.53, 0.36), None],
    "F-MixUp": [(75.33, 0.67), (1.0460, 0.0023)],
    "Auto-F-Mix": [(76.88, 0.52), (1.0464, 0.0003)],
    "DTG-AuxL": [(77.75, 0.27), (1.0426, 0.0009)],
}

_T6_COLS = ["CUB ResNet50", "CUB-5shot ResNet50", "Toys RMSE"]
_T6 = {
    "AFM": [(80.30, 0.57), (46.97, 0.95), (0.9187, 0.0003)],
    "AuxL+AFM": [(79.70, 1.07), (47.84, 1.25), (0.9195, 0.0011)],
    "MAXL+AFM": [(80.76, 0.38), (47.96, 0.89), None],
    "JTDS+AFM": [(80.52, 0.90), (48.14, 0.87), (0.9189, 0.0013)],
    "DTG-AuxL": [(81.73, 0.20), (52.33, 1.36), (0.9153, 0.0004)],
}

TABLES: dict[str, dict] = {
    "table1": {
        "caption": "Overall performance over 5 seeds (accuracy % / RMSE); Share-Input: CUB, CIFAR100, Toys, Movies; "
                   "Different-Input: CIFAR10-100, Pet-CUB. JTDS cannot run Different-Input, MAXL cannot run regression.",
        "source": f"{_SOURCE}, Table 1",
        "columns": _T1_COLS,
        "rows": _rows(_T1_COLS, _T1),
    },
    "table2": {
        "caption": "Accuracy (%) on CUB few-shot (5 and 10 labelled images per class), ResNet50.",
        "source": f"{_SOURCE}, Table 2",
        "columns": _T2_COLS,
        "rows": _rows(_T2_COLS, _T2),
    },
    "table4": {
        "caption": "Ablation of the generator components and the training strategy.",
        "source": f"{_SOURCE}, Table 4",
        "columns": _T4_COLS,
        "rows": _rows(_T4_COLS, _T4),
    },
    "table5": {
        "caption": "Comparison with MixUp methods (MixUp cannot run on categorical recommendation inputs).",
        "source": f"{_SOURCE}, Table 5",
        "columns": _T5_COLS,
        "rows": _rows(_T5_COLS, _T5),
    },
    "table6": {
        "caption": "Auto-F-Mix (AFM) combined with auxiliary learning methods, against DTG-AuxL.",
        "source": f"{_SOURCE}, Table 6",
        "columns": _T6_COLS,
        "rows": _rows(_T6_COLS, _T6),
    },
}
