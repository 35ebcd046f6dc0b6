"""Synthetic on-device data with real-time distribution shift, for examples/persona_pipeline.py.

Every device belongs, in each session, to one of a few interest groups; a group is a linear
labelling rule over the device's features, and the rules differ strongly between groups (so one
static classifier cannot serve them all). Shift happens two ways:
  * devices switch group between sessions (a Markov chain), and
  * every group's rule drifts with the session index, past the range seen in the history.
A session holds ``realtime`` labelled interactions the device uploads (summarised into the
device embedding) followed by ``query`` interactions the adapted model must label.
Everything is generated from one seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Sessions:
    x: Tensor          # [N, realtime + query, features]
    y: Tensor          # [N, realtime + query] int64 labels
    group: Tensor      # [N] the session's true group (for reporting only)
    realtime: int      # the first `realtime` interactions are the uploaded real-time data

    @property
    def query_x(self) -> Tensor:
        return self.x[:, self.realtime:]

    @property
    def query_y(self) -> Tensor:
        return self.y[:, self.realtime:]

    def embedding(self, classes: int) -> Tensor:
        """The device embedding E(X_R): per-class mean of the real-time features plus the
        class frequencies, i.e. what the device's recent clicks say about its current rule."""
        x, y = self.x[:, :self.realtime], self.y[:, :self.realtime]
        onehot = torch.nn.functional.one_hot(y, classes).to(x.dtype)          # [N, R, C]
        per_class = torch.einsum("nrc,nrf->ncf", onehot, x) / self.realtime   # [N, C, F]
        return torch.cat([per_class.flatten(1), onehot.mean(1)], 1)

    def __len__(self) -> int:
        return self.x.shape[0]


class ShiftingDevices:
    """Devices whose interest group switches and whose groups' rules drift over sessions."""

    def __init__(self, devices: int, groups: int, features: int, classes: int, seed: int,
                 switch: float = 0.3, drift: float = 0.5, realtime: int = 24, query: int = 24):
        self.devices, self.groups, self.features, self.classes = devices, groups, features, classes
        self.switch, self.drift, self.realtime, self.query = switch, drift, realtime, query
        self.gen = torch.Generator().manual_seed(seed)
        g = self.gen
        self.rules = torch.randn(groups, features, classes, generator=g) * 2.0   # group rules A_g
        self.rule_drift = torch.randn(groups, features, classes, generator=g)    # dA_g per session
        self.centers = torch.randn(groups, features, generator=g) * 0.5          # where a group's inputs lie
        self.state = torch.randint(0, groups, (devices,), generator=g)

    def _step_groups(self) -> None:
        moves = torch.rand(self.devices, generator=self.gen) < self.switch
        fresh = torch.randint(0, self.groups, (self.devices,), generator=self.gen)
        self.state = torch.where(moves, fresh, self.state)

    def session(self, t: int) -> Sessions:
        """Session t for every device (call with increasing t; the groups move between calls)."""
        if t > 0:
            self._step_groups()
        n = self.realtime + self.query
        grp = self.state.clone()
        x = self.centers[grp].unsqueeze(1) + torch.randn(self.devices, n, self.features, generator=self.gen)
        rule = self.rules[grp] + self.drift * t * self.rule_drift[grp] / 4       # [N, F, C]
        y = torch.bmm(x, rule).argmax(-1)
        return Sessions(x, y, grp, self.realtime)

    def sessions(self, first: int, count: int) -> Sessions:
        parts = [self.session(t) for t in range(first, first + count)]
        return Sessions(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]),
                        torch.cat([p.group for p in parts]), self.realtime)
