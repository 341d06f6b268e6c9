"""Many models of one architecture trained as one: the members of a batched fit (the folds and seeds
of a table row, :mod:`ichpro.train`).

Every member is the same network with its own weights, buffers, batches and optimizer state. Their
trainable parameters and buffers are stacked along a leading member dimension (:class:`MemberStack`),
and one ``torch.func.vmap`` over ``functional_call`` runs all the members' forward passes, and so
their backward passes, at once: matrix products become batched matmuls and convolutions grouped
ones, so that small models keep the cores busy instead of paying each operation's overhead once per
member. Frozen encoders are shared, not stacked. A member's loss reads only its own parameters and
batch, so its gradients, and the per-member Adam of :class:`StackedAdam`, are those it would have
alone; only the order of floating-point sums may differ (``bench/batched_fit.py`` measures the
speed, ``tests/test_ensemble.py`` the equality).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from ichpro.models import PrognosisModel


def trainable_state(model: PrognosisModel) -> dict[str, torch.Tensor]:
    """What differs between members: the trainable parameters and every buffer outside the frozen
    encoders (``PrognosisModel.frozen_prefixes``), by state-dict name."""
    frozen = tuple(model.frozen_prefixes)
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    state.update((name, b) for name, b in model.named_buffers() if not name.startswith(frozen))
    return state


def draws_global_randomness(model: nn.Module) -> bool:
    """Whether training ``model`` draws from torch's global RNG: a dropout layer that training mode
    turns on (frozen encoders stay in eval mode). Such a model cannot be batched with others and
    still train as it would alone, since the members would share the draws."""
    was_training = model.training
    model.train()
    found = any(m.training and ((isinstance(m, nn.Dropout) and m.p > 0)
                                or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0))
                for m in model.modules())
    model.train(was_training)
    return found


class MemberStack(nn.Module):
    """The members' trainable state stacked (member, ...) around one template model.

    ``template`` gives the architecture and the shared frozen encoders; ``states`` holds each
    member's :func:`trainable_state`. Calls take the indices of the members to run and their batches
    stacked (member, batch, ...) (:func:`ichpro.batches.stack_batches`).
    """

    def __init__(self, template: PrognosisModel, states: Sequence[Mapping[str, torch.Tensor]]):
        super().__init__()
        self._template = [template]  # not a submodule: the stack owns only the stacked tensors
        trainable = {name for name, p in template.named_parameters() if p.requires_grad}
        self.names = list(states[0])
        self.trainable = [name for name in self.names if name in trainable]
        self.params = nn.ParameterList(nn.Parameter(torch.stack([s[name].detach() for s in states]))
                                       for name in self.trainable)
        self.buffer_names = [name for name in self.names if name not in trainable]
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"stacked{i}", torch.stack([s[name] for s in states]).clone())
        self.size = len(states)

    @property
    def template(self) -> PrognosisModel:
        return self._template[0]

    def train(self, mode: bool = True) -> MemberStack:
        """Train or eval mode for every member (the template's rules apply: frozen encoders stay in eval)."""
        super().train(mode)
        self.template.train(mode)
        return self

    def _stacked(self) -> dict[str, torch.Tensor]:
        buffers = (getattr(self, f"stacked{i}") for i in range(len(self.buffer_names)))
        return dict(zip(self.trainable + self.buffer_names, [*self.params, *buffers], strict=True))

    def member_state(self, member: int, persistent_only: bool = True) -> dict[str, torch.Tensor]:
        """Member ``member``'s tensors by state-dict name (views into the stack): its checkpoint, without
        the buffers the model does not save (rebuilt by ``fit_training_patients``) unless asked."""
        saved = set(self.template.state_dict()) if persistent_only else set(self.names)
        return {name: t[member] for name, t in self._stacked().items() if name in saved}

    @torch.no_grad()
    def load_member(self, member: int, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite member ``member``'s tensors with ``state`` (a checkpoint: every saved name)."""
        for name, tensor in self._stacked().items():
            if name in state:
                tensor[member].copy_(state[name])

    def run(self, members: Sequence[int], batch: Mapping[str, Any], fn: Callable[[Any], Any],
            randomness: str = "error") -> Any:
        """``fn(model output)`` of each of ``members`` on its slice of ``batch`` (stacked along dim 0;
        a value that is not a tensor is shared), stacked along dim 0. Buffer updates (BatchNorm's
        running statistics) land in the members' slices. A single member runs without ``vmap`` (which
        would make its convolutions grouped ones of one group, slower than plain ones), on views of
        its slices; ``randomness`` is ``vmap``'s (a single member draws as a lone model does)."""
        stacked = self._stacked()
        if len(members) == 1:  # one member: its slices (views) without vmap, which costs a lone model
            state = {name: t[members[0]] for name, t in stacked.items()}
            alone = {key: v[0] if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
            out = fn(functional_call(self.template, state, (alone,)))
            return _with_member_dim(out)
        everyone = list(members) == list(range(self.size))
        index = torch.as_tensor(list(members), device=self.params[0].device)
        entries = stacked if everyone else {name: t[index] for name, t in stacked.items()}
        dims = {key: 0 if isinstance(value, torch.Tensor) else None for key, value in batch.items()}

        def one(state: dict[str, torch.Tensor], member_batch: dict[str, Any]) -> Any:
            return fn(functional_call(self.template, state, (member_batch,)))

        out = vmap(one, in_dims=(0, dims), randomness=randomness)(entries, dict(batch))
        if not everyone:
            with torch.no_grad():
                for name in self.buffer_names:
                    stacked[name][index] = entries[name]
        return out

    def forward(self, groups: Sequence[tuple[Sequence[int], Mapping[str, Any]]], randomness: str = "error"
                ) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
        """Training forward of several groups of members, each with its stacked batch (members whose
        batches differ in shape go in separate groups): the sum of the members' losses (one backward
        trains them all) and each member's loss terms."""
        total, terms = None, {}
        for members, batch in groups:
            loss, values = self.run(members, batch, lambda out: (out.loss, out.terms), randomness)
            total = loss.sum() if total is None else total + loss.sum()
            for i, member in enumerate(members):
                terms[member] = {name: value[i] for name, value in values.items()}
        return total, terms


def _with_member_dim(out: Any) -> Any:
    """Tensors (in tuples and dicts) with a leading member dimension of size 1, as ``vmap`` returns."""
    if isinstance(out, torch.Tensor):
        return out.unsqueeze(0)
    if isinstance(out, dict):
        return {key: _with_member_dim(value) for key, value in out.items()}
    return type(out)(_with_member_dim(value) for value in out)


class StackedAdam:
    """Adam (``torch.optim.Adam``'s update, without amsgrad) over stacked parameters, one state per
    member: :meth:`step` updates only the members named, each with its own step count."""

    def __init__(self, params: Sequence[nn.Parameter], members: int, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(members, dtype=torch.long)

    @torch.no_grad()
    def step(self, members: Sequence[int]) -> None:
        """One update of ``members`` from their accumulated gradients, which are then cleared."""
        members = list(members)
        if not members:
            return
        # every member: in place on the whole tensors; some: on copies of their slices, written back
        index = slice(None) if members == list(range(len(self.steps))) else members
        self.steps[index] += 1
        beta1, beta2 = self.betas
        step = self.steps[index].double()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            shape = (len(members),) + (1,) * (p.dim() - 1)
            step_size = (self.lr / (1 - beta1 ** step)).to(p.dtype).view(shape)
            bias2 = (1 - beta2 ** step).sqrt().to(p.dtype).view(shape)
            weights, mean, square = p.data[index], m[index], v[index]
            grad = torch.zeros_like(weights) if p.grad is None else p.grad[index]
            if self.weight_decay:
                grad = grad + self.weight_decay * weights
            mean.lerp_(grad, 1 - beta1)
            square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            weights.sub_(mean / (square.sqrt() / bias2).add_(self.eps) * step_size)
            if isinstance(index, list):
                p.data[index], m[index], v[index] = weights, mean, square
            if p.grad is not None:
                p.grad[index] = 0

    def member_state(self, member: int, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict]:
        """Member ``member``'s moments by parameter name, and its JSON-able rest (step, settings)."""
        tensors = {}
        for name, m, v in zip(names, self.exp_avg, self.exp_avg_sq, strict=True):
            tensors[f"{name}.exp_avg"], tensors[f"{name}.exp_avg_sq"] = m[member], v[member]
        meta = {"step": int(self.steps[member]), "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}
        return tensors, meta

    @torch.no_grad()
    def load_member(self, member: int, names: Sequence[str], tensors: Mapping[str, torch.Tensor],
                    meta: Mapping) -> None:
        """Restore what :meth:`member_state` returned."""
        for name, m, v in zip(names, self.exp_avg, self.exp_avg_sq, strict=True):
            m[member].copy_(tensors[f"{name}.exp_avg"])
            v[member].copy_(tensors[f"{name}.exp_avg_sq"])
        self.steps[member] = meta["step"]
