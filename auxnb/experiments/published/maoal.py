"""MAOAL (Chen et al., NeurIPS 2022) as published: Tables 1–4, quoted, never recomputed.

Each value is the paper's mean over 3 seeds; the column ``"<column> ±"`` holds the standard
deviation printed as a subscript. Accuracy / mIoU / pixel accuracy in percent (higher is
better), RMSE for Beauty and MovieLens (lower is better). Method names as printed (SLL is
auxnb's ``stl``).
"""

from __future__ import annotations

__all__ = ["TABLES"]

_SOURCE = "Chen et al., Module-Aware Optimization for Auxiliary Learning, NeurIPS 2022"


def _rows(columns: list[str], data: dict[str, list[tuple[float, float]]]) -> list[dict]:
    rows = []
    for method, values in data.items():
        row: dict = {"method": method}
        for col, (mean, std) in zip(columns, values):
            row[col], row[f"{col} ±"] = mean, std
        rows.append(row)
    return rows


_T1_COLS = ["CUB", "Pet", "CIFAR10", "CIFAR100", "Beauty RMSE", "MovieLens RMSE"]
_T1 = {
    "SLL": [(77.29, 0.63), (61.14, 1.03), (71.60, 0.25), (46.52, 0.42), (1.1008, 0.0006), (0.9068, 0.0028)],
    "Equal": [(71.68, 0.87), (67.52, 0.58), (70.60, 0.30), (45.57, 0.25), (2.4512, 0.0013), (2.2567, 0.0052)],
    "HPO-tune": [(76.72, 0.71), (66.91, 0.46), (71.51, 0.05), (46.33, 0.24), (1.0918, 0.0004), (0.9379, 0.0008)],
    "GCS": [(71.59, 0.10), (66.69, 0.77), (70.95, 0.02), (45.69, 0.01), (1.0956, 0.0018), (0.9137, 0.0001)],
    "Uncert": [(71.64, 1.15), (67.42, 0.81), (71.00, 0.42), (46.37, 0.01), (1.0942, 0.0004), (0.9883, 0.0001)],
    "AuxL": [(76.99, 0.81), (66.41, 0.97), (71.58, 0.05), (46.98, 0.06), (1.0893, 0.0028), (0.9063, 0.0018)],
    "MAOAL": [(77.30, 0.17), (69.61, 0.93), (72.24, 0.27), (47.57, 0.40), (1.0873, 0.0017), (0.9045, 0.0013)],
}

_T2_COLS = ["CUB-semi", "Pet-semi"]
_T2 = {
    "SLL": [(48.15, 0.88), (31.81, 1.17)],
    "Equal": [(50.54, 0.55), (49.07, 0.94)],
    "HPO-tune": [(50.34, 0.71), (49.28, 1.25)],
    "GCS": [(51.06, 0.59), (47.16, 0.57)],
    "Uncert": [(50.63, 0.16), (47.96, 1.04)],
    "AuxL": [(48.50, 0.74), (46.10, 0.58)],
    "MAOAL": [(52.36, 0.64), (51.42, 0.31)],
}

_T3_COLS = ["NYUv2 mIoU", "NYUv2 pixel acc", "CIFAR-100/20 acc"]
_T3 = {
    "SLL": [(32.61, 0.21), (68.42, 0.62), (49.73, 0.61)],
    "Equal": [(33.15, 0.15), (68.11, 0.24), (51.27, 0.61)],
    "HPO-tune": [(33.09, 0.25), (68.52, 0.52), (51.75, 0.72)],
    "Uncert": [(32.93, 0.32), (68.74, 0.62), (48.40, 0.72)],
    "GCS": [(32.18, 0.34), (67.58, 0.80), (51.80, 0.40)],
    "AuxL": [(33.06, 0.14), (68.36, 0.53), (51.53, 0.23)],
    "MAOAL": [(33.88, 0.23), (69.17, 0.44), (53.87, 0.46)],
}

_T4_COLS = ["CUB-semi", "Pet"]
_T4 = {
    "Parameter-L": [(52.48, 0.79), (66.14, 0.60)],
    "Block-L": [(52.36, 0.64), (69.61, 0.93)],
    "Model-L": [(51.16, 0.42), (67.18, 0.75)],
}

TABLES: dict[str, dict] = {
    "table1": {
        "caption": (
            "MAOAL Table 1: performance of different methods under different scenarios. Top-1 accuracy (%) "
            "on CUB (ResNet18 pretrained; wing colour + bill shape auxiliaries), Pet, CIFAR10, CIFAR100 "
            "(rotation auxiliary; ResNet18 / 4-layer ConvNet from scratch); RMSE on Amazon Beauty and "
            "MovieLens-1M (AutoInt; L2 regulariser as the auxiliary loss; lower is better). Mean ± std of 3 seeds."
        ),
        "source": _SOURCE,
        "columns": ["method", *_T1_COLS],
        "rows": _rows(_T1_COLS, _T1),
    },
    "table2": {
        "caption": (
            "MAOAL Table 2: performance with only 20% of the primary labels (semi-supervised), top-1 "
            "accuracy (%), mean ± std of 3 seeds. Printed with datasets as rows; transposed here."
        ),
        "source": _SOURCE,
        "columns": ["method", *_T2_COLS],
        "rows": _rows(_T2_COLS, _T2),
    },
    "table3": {
        "caption": (
            "MAOAL Table 3: more auxiliary tasks. NYUv2 (segmentation primary; depth and normal "
            "auxiliaries; EfficientNet in 8 blocks): mIoU (%) and pixel accuracy (%); CIFAR-100/20 "
            "('people' primary, coarse classes 0–9 as 10 auxiliaries; ResNet18): accuracy (%). Mean ± std."
        ),
        "source": _SOURCE,
        "columns": ["method", *_T3_COLS],
        "rows": _rows(_T3_COLS, _T3),
    },
    "table4": {
        "caption": (
            "MAOAL Table 4: performance of different choices of modules (partitions): Parameter-L (every "
            "entry of model.named_parameters()), Block-L (ResNet blocks; the paper's default) and Model-L "
            "(the whole model: a loss weighting). Top-1 accuracy (%), mean ± std; the 'method' column "
            "holds the partition."
        ),
        "source": _SOURCE,
        "columns": ["method", *_T4_COLS],
        "rows": _rows(_T4_COLS, _T4),
    },
}
