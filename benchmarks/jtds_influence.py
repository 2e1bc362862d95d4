"""What JTDS's hypergradient says about each sample of its upper batch, upper step by upper step (issue 22).

JTDS's loss filter σ(a·l̂ + b) learns its slope a from uᵀ∂g/∂φ = ∂/∂φ Σ_i w_i(φ)·s_i over the upper step's
train batch, with s_i = ∇θ l_i · u the influence of sample i (u: the Neumann series from the dev loss); φ
moves so that samples with a larger s_i weigh more. This script trains a `no_harm.py` entry exactly as
``no_harm.py`` does (the same run, bit for bit: the extra passes below replay the upper step's dropout masks
and give the random state back) and records, at every upper step, each primary sample's loss, influence
s_i, gradient norm ‖∇θ l_i‖ and cos(∇θ l_i, u), with whether its label was corrupted. One row per upper step:

* ``cos_clean`` / ``cos_corrupted``: the mean cosine of clean and corrupted samples' gradients with u
  (> 0: a step on that sample lowers the dev loss, to first order);
* ``corr_s_loss``: the correlation of s_i with the loss over the batch (> 0: the filter's slope a is pushed
  up, high-loss samples up-weighted); ``corr_s_loss_clean`` / ``_corrupted`` within each group.

    python benchmarks/jtds_influence.py --case f-noise-40% --label "JTDS dev in train" --seeds 0-9 \\
        --csv benchmarks/results/jtds_influence.csv

(about 1.5 minutes a seed on one CPU thread: 64 per-sample backward passes per upper step.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import no_harm  # noqa: E402


def _influence_class():
    import torch

    from auxnb.methods.jtds import JTDS
    from auxnb.tasks import PRIMARY_STREAM

    import auxnb.methods.bilevel as bilevel

    seen: dict[str, Any] = {}
    original = bilevel.implicit_grad

    def implicit_grad(outer, inner, params, hparams, **kwargs):  # keeps the series' inputs for the probes below
        seen.update(outer=outer, inner=inner)
        return original(outer, inner, params, hparams, **kwargs)

    bilevel.implicit_grad = implicit_grad

    class InfluenceJTDS(JTDS):
        """JTDS that records its upper batch's per-sample influences (and changes nothing of the run).

        `probe_terms`: for each K in it, the series u_K = Σ_{i≤K} (I − ηJ)^i ∇θL_dev (the run's η and J) and
        what the filter's slope would be told with it, at the same θ and batch: a longer horizon than the run's K."""

        probe_terms: tuple[int, ...] = ()

        def setup(self, model, info):
            super().setup(model, info)
            self.influence_rows: list[dict[str, Any]] = []

        def hparam_product(self, model, context, batch, terms, params, rng):
            main = super().hparam_product(model, context, batch, terms, params, rng)

            def product(u):
                out = main(u)
                self._record_influence(context, batch, params, rng, u)
                row = self.influence_rows[-1]
                row["a_product"] = float(out[self._a_index()][self._primary_col])
                for k, u_k in self._probe_series(params).items():
                    row[f"a_product_K{k}"] = float(main(u_k)[self._a_index()][self._primary_col])
                    row.update({f"{name}_K{k}": value for name, value in self._influence(context, batch, params, rng, u_k).items()
                                if name.startswith("cos_") or name == "corr_s_loss"})
                return out

            return product if main is not None else None

        def _a_index(self) -> int:
            return next(i for i, h in enumerate(self.hparams()) if h is self.filter_a)

        def _probe_series(self, params):
            if not self.probe_terms:
                return {}
            outer, inner = seen["outer"], seen["inner"]
            eta = float(self._auto_eta)
            v = torch.autograd.grad(outer, params, retain_graph=True, allow_unused=True, materialize_grads=True)
            term, total, out = list(v), list(v), {}
            for i in range(1, max(self.probe_terms) + 1):
                hv = torch.autograd.grad(inner, params, grad_outputs=term, retain_graph=True, allow_unused=True,
                                         materialize_grads=True)
                term = [a - eta * b for a, b in zip(term, hv)]
                total = [a + b for a, b in zip(total, term)]
                if i in self.probe_terms:
                    out[i] = tuple(t.detach().clone() for t in total)
            return out

        def _record_influence(self, context, batch, params, rng, u) -> None:
            self.influence_rows.append({"step": int(context.step), "filter_a": float(self.slope()[self._primary_col].detach()),
                                        **self._influence(context, batch, params, rng, u)})

        def _influence(self, context, batch, params, rng, u) -> dict[str, Any]:
            primary = context.tasks.primary.name
            state = torch.get_rng_state()
            torch.set_rng_state(rng[0])  # the upper batch's own dropout masks
            try:
                t = context.terms(batch, names=[primary])
                losses, ids = t.losses[primary], t.index[PRIMARY_STREAM]
                unorm = float(torch.sqrt(sum((x * x).sum() for x in u)))
                s, norm = [], []
                for i in range(len(losses)):
                    g = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True, materialize_grads=True)
                    s.append(float(sum((a * b).sum() for a, b in zip(g, u))))
                    norm.append(float(torch.sqrt(sum((a * a).sum() for a in g))))
            finally:
                torch.set_rng_state(state)
            loss = losses.detach().cpu().numpy()
            s_, n_ = np.array(s), np.array(norm)
            cos = s_ / np.maximum(n_ * unorm, 1e-30)
            if self._corrupted is None:
                raise SystemExit("jtds_influence.py needs a case with label noise (the bundle's corrupted flags)")
            bad = self._corrupted[ids].cpu().numpy().astype(bool)

            def corr(x, y):
                return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and x.std() > 0 and y.std() > 0 else float("nan")

            return {
                "n_clean": int((~bad).sum()), "n_corrupted": int(bad.sum()),
                "cos_clean": float(cos[~bad].mean()), "cos_corrupted": float(cos[bad].mean()),
                "s_clean": float(s_[~bad].mean()), "s_corrupted": float(s_[bad].mean()),
                "gnorm_clean": float(n_[~bad].mean()), "gnorm_corrupted": float(n_[bad].mean()),
                "corr_s_loss": corr(s_, loss), "corr_s_loss_clean": corr(s_[~bad], loss[~bad]),
                "corr_s_loss_corrupted": corr(s_[bad], loss[bad]),
            }

    return InfluenceJTDS


def run_seed(case: str, label: str, seed: int, probe_terms: tuple[int, ...] = ()) -> pd.DataFrame:
    import torch

    from auxnb.experiments import get_setting, run

    torch.set_num_threads(1)
    entry = next((e for e in no_harm.entries(explore=True) if e.case == case and e.label == label), None)
    if entry is None or entry.method != "jtds":
        raise SystemExit(f"no JTDS entry {label!r} for case {case!r} in benchmarks/no_harm.py")
    setting, overrides, _ = no_harm.CASES[case]
    defaults = dict(get_setting(setting).method_defaults.get("jtds", {}).get("small", {}))
    method = _influence_class()(**{**defaults, **entry.kwargs})
    method.probe_terms = tuple(probe_terms)
    t0 = time.perf_counter()
    result = run(setting, method, seed=seed, scale="small", device="cpu", progress=False, guard=None,
                 **{**overrides, "test_size": None, **entry.overrides})
    last = result.trace[-1] if result.trace else {}
    frame = pd.DataFrame(method.influence_rows)
    return frame.assign(case=case, label=label, seed=seed, test=result.test_metric,
                        batch_weight_auc=last.get("batch_weight_auc"), seconds=time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="f-noise-40%")
    parser.add_argument("--label", default="JTDS dev in train")
    parser.add_argument("--seeds", default="0-4", help="a-b or a,b,c")
    parser.add_argument("--csv", type=Path, required=True, help="rows are appended per seed (resumable)")
    parser.add_argument("--probe-terms", default="", help="e.g. 5,10,20: the filter's hypergradient with K Neumann terms "
                        "at the same θ and batch (the run itself keeps its own K)")
    args = parser.parse_args(argv)
    if "-" in args.seeds:
        lo, hi = map(int, args.seeds.split("-"))
        seeds = list(range(lo, hi + 1))
    else:
        seeds = [int(s) for s in args.seeds.split(",")]
    done = set()
    if args.csv.exists():
        old = pd.read_csv(args.csv)
        done = set(old.loc[(old["case"] == args.case) & (old["label"] == args.label), "seed"])
    for seed in seeds:
        if seed in done:
            continue
        probe = tuple(int(k) for k in args.probe_terms.split(",") if k)
        frame = run_seed(args.case, args.label, seed, probe)
        frame.to_csv(args.csv, mode="a", header=not args.csv.exists(), index=False)
        first = frame.iloc[0] if len(frame) else None
        print(f"{args.case} {args.label} seed {seed}: test {frame['test'].iloc[0]:.4f}, AUC {frame['batch_weight_auc'].iloc[0]:.2f}, "
              f"first upper step cos clean/corrupted {first['cos_clean']:+.3f}/{first['cos_corrupted']:+.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
