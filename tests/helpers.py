"""Small pieces shared by the method tests (not tests themselves)."""

import torch

from auxnb.methods.base import SetupInfo


class Recorder(torch.optim.Optimizer):
    """A φ 'optimiser' that records the hypergradient it is handed and leaves φ alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])


def setup_info(tasks, seed: int = 0) -> SetupInfo:
    return SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=10, seed=seed)


class Stop(Exception):
    """Raised by `stop_at_eval` to interrupt a run as a crash would."""


def stop_at_eval(n: int):
    """A Trainer callback that raises `Stop` at the n-th evaluation it sees (counted across the runs of a
    selection: each candidate's evaluations follow the previous one's)."""
    seen = []

    def callback(event, info):
        if event == "eval":
            seen.append(info["step"])
            if len(seen) == n:
                raise Stop

    return callback
