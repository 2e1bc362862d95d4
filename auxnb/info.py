"""What the command line shows before it imports torch: the `--set` keys and the methods' one-liners.

Plain data only: this module must never import torch, numpy or another auxnb module, so that
``python -m auxnb --help`` stays fast. Tests check it against the live registries.
"""

from __future__ import annotations

__all__ = ["OVERRIDES", "METHODS"]

#: Knobs a user may override (``experiments.run(**overrides)``, ``--set key=value``): type and meaning.
OVERRIDES: dict[str, tuple[type, str]] = {
    "label_fraction": (float, "fraction of primary labels kept per class in D_train (semi-supervised)"),
    "label_noise": (float, "rate r of the corruption matrix (1-r)I + r/C applied to D_train labels"),
    "shots": (int, "k labelled primary samples per class (few-shot)"),
    "epochs": (int, "passes over the primary D_train"),
    "steps": (int, "total lower steps (overrides epochs)"),
    "batch_size": (int, "batch size of every stream"),
    "lr": (float, "lower optimiser learning rate"),
    "optimizer": (str, "lower optimiser: sgd, adam or adamw"),
    "momentum": (float, "SGD momentum"),
    "weight_decay": (float, "lower optimiser weight decay"),
    "scheduler": (str, "'cosine' or 'none'"),
    "grad_clip": (float, "clip the norm of the lower update direction (>= 0; 'none' switches it off)"),
    "dev_size": (int, "size of D_dev carved from D_train (bi-level methods train φ on it)"),
    "val_size": (int, "size of the validation split"),
    "test_size": (int, "size of the test split"),
    "backbone": (str, "backbone name (setting-specific)"),
    "eval_every": (int, "evaluate on val every this many lower steps"),
    "freeze_aux_buffers": (bool, "auxiliary streams leave BatchNorm running statistics alone"),
    "aux_size": (int, "number of auxiliary (Different-Input) samples used"),
    "rotation_mode": (str, "'all' (4 rotations per image) or 'random' (one per image)"),
    # paper-dataset settings (issue 7)
    "train_size": (int, "stratified subsample of the training pool before D_dev is carved (CPU-sized runs)"),
    "image_size": (int, "side the images are resized to at load time (CUB / Pet: 256, cropped to 224)"),
    "pretrained": (str, "backbone weights: 'auto' (<data root>/weights/<torchvision file>), 'none' or a path"),
    "download": (bool, "fetch a missing dataset from its official source where it allows it (needs internet)"),
    "l2_coefficient": (float, "rating settings with the L2 auxiliary task: c in the loss c·‖θ‖² (paper scale: the authors' 1e-3)"),
}

#: Registry name -> (what it does in one line, where it comes from).
METHODS: dict[str, tuple[str, str]] = {
    "stl": ("primary task only, trained on D_train ∪ D_dev", "single-task baseline"),
    "equal": ("every task's loss weighted 1", "multi-task baseline"),
    "fixed": ("constant task weights you give", "multi-task baseline"),
    "hpo-tune": ("random search over fixed auxiliary weights, selected on D_val", "baseline"),
    "uncert": ("task weights from learned homoscedastic uncertainty", "Kendall et al., CVPR 2018"),
    "gcs": ("auxiliary gradient weighted by max(0, cosine with the primary's)", "Du et al., arXiv 2018"),
    "auxl": ("a learned monotone network combines the losses (bi-level)", "Navon et al., ICLR 2021"),
    "maoal": ("learns which auxiliary loss may update which module (bi-level)", "Chen et al., NeurIPS 2022"),
    "jtds": ("learns how much each sample of each task counts (bi-level)", "Chen et al., ICML 2022"),
    "n-jtds": ("one free learned weight per (sample, task) (bi-level)", "Chen et al., ICML 2022"),
    "dtg": ("generates new auxiliary samples and labels (bi-level)", "Chen et al., NeurIPS 2023"),
    "mixup": ("MixUp of inputs as an extra auxiliary loss", "Zhang et al., ICLR 2018"),
    "f-mixup": ("MixUp of backbone features as an extra auxiliary loss", "Verma et al., ICML 2019"),
    "auto-mix": ("MixUp with mixing and task weights learned (bi-level)", "DTG-AuxL Table 5 baseline"),
    "auto-f-mix": ("feature MixUp with its weights learned (bi-level)", "DTG-AuxL Table 5 baseline"),
    "maxl": ("a label generator learns an auxiliary task (bi-level)", "Liu et al., NeurIPS 2019"),
    "aggregator": ("a TorchJD gradient aggregator (PCGrad, CAGrad, Nash-MTL, UPGrad, MGDA, ...) over the task gradients",
                   "TorchJD; each aggregator's paper"),
    "auto-lambda": ("task weights by a one-step look-ahead on the primary dev loss (bi-level)", "Liu et al., TMLR 2022"),
    "auxinash": ("asymmetric Nash bargaining over task gradients, powers learned (bi-level)", "Shamsian et al., ICML 2023"),
    "forkmerge": ("forks branches with different task weights and merges them by D_dev every Δt steps", "Jiang et al., NeurIPS 2023"),
}
