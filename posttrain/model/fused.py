"""Fused projections for LoRA layers that read the same input (fast.fused_projections).

A decoder layer calls q_proj, k_proj and v_proj on one hidden state, and gate_proj and
up_proj on another. In peft each is a frozen matmul plus a LoRA pair (x @ A.T, then @ B.T,
scaled, added): three matmuls and two elementwise passes per projection, and in the
backward each one's input gradient is written and summed separately. Fused, the first
member of a group called on an input computes the whole group: one matmul against the
members' frozen weights side by side, one against their A matrices stacked, and one
`addmm` that adds the (block-diagonal) B's scaled product to it; the other members, called
next on the same tensor, take their slice. A projection alone in its group (o_proj,
down_proj) gets the same two matmuls and one `addmm` in place of peft's matmul, scale and
add. The math is the same sum: in float64 the two agree to 1e-10 and in fp32 to float
rounding (a test checks); under bf16 the adapter's product is rounded once where peft
rounds it three times (product, scale, sum), and the test bounds its distance to the exact
sum by the per-projection path's.

Only dropout-free adapters (RL's, rl.lora_dropout=0) fuse: dropout draws its own mask per
layer. A layer whose state the fused path does not cover (adapters disabled or merged, more
than one adapter active, a LoRA variant, a bias, extra arguments) runs peft's own forward.
"""
from __future__ import annotations

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",),
          ("down_proj",))


class _Group:
    """The members of one fused group, the frozen weights side by side (cached, with the
    members' weights re-pointed at their rows of it), and the outputs not yet taken."""

    def __init__(self, members):
        self.members = members
        self.weight = None
        self.x = None          # the input the pending outputs were computed for
        self.pending = {}      # member index -> its output

    def __deepcopy__(self, memo):
        """A copy for the copied model (the merged sampler's): its members and weight, no
        outputs in flight (they are graph tensors, and belong to this model's forward)."""
        import copy

        new = _Group([copy.deepcopy(m, memo) for m in self.members])
        new.weight = copy.deepcopy(self.weight, memo)
        return new

    def frozen_weight(self):
        weights = [m.base_layer.weight for m in self.members]
        w = self.weight
        if w is not None and all(p.device == w.device and p.dtype == w.dtype
                                 for p in weights):
            rows = 0
            for p in weights:
                if p.data_ptr() != w[rows:].data_ptr():
                    break
                rows += p.shape[0]
            else:
                return w
        w = torch.cat([p.detach() for p in weights])
        rows = 0
        for p in weights:  # the members' weights become views of the side-by-side copy
            p.data = w[rows:rows + p.shape[0]]
            rows += p.shape[0]
        self.weight = w
        return w

    def run(self, x):
        import torch.nn.functional as F

        members = self.members
        name = members[0].active_adapters[0]
        a = torch.cat([m.lora_A[name].weight for m in members])
        b = torch.block_diag(*[m.lora_B[name].weight for m in members])
        scale = members[0].scaling[name]
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype == torch.float32:
            x = x.to(torch.get_autocast_dtype(device))  # autocast would cast it per matmul
        y = F.linear(x, self.frozen_weight())
        h = F.linear(x, a)
        y = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                        alpha=scale).view(y.shape)
        return y.split([m.base_layer.weight.shape[0] for m in members], dim=-1)


def _fusable(group: _Group) -> bool:
    """Whether every member is in the state the fused path computes: one vanilla adapter,
    active, unmerged, dropout-free, the same scaling, no bias."""
    first = group.members[0]
    active = first.active_adapters
    if len(active) != 1:
        return False
    name = active[0]
    for m in group.members:
        if (m.disable_adapters or m.merged or list(m.active_adapters) != list(active)
                or name not in m.lora_A or name in getattr(m, "lora_variant", {})
                or not isinstance(m.lora_dropout[name], torch.nn.Identity)
                or m.scaling[name] != first.scaling[name]
                or getattr(m.base_layer, "bias", None) is not None):
            return False
    return True


def _fused_forward(self, x, *args, **kwargs):
    group = self._posttrain_group
    index = group.members.index(self)
    if group.x is x and index in group.pending and not (args or kwargs):
        out = group.pending.pop(index)   # the group's first member computed it, checked
        if not group.pending:
            group.x = None
        return out
    group.x, group.pending = None, {}
    if args or kwargs or not _fusable(group):
        return type(self).__mro__[1].forward(self, x, *args, **kwargs)
    outs = group.run(x)
    group.pending = {i: o for i, o in enumerate(outs) if i != index}
    group.x = x if group.pending else None
    return outs[index]


_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward})
    return _CLASSES[cls]


def fuse_projections(model) -> int:
    """Group the LoRA projections of `model` that share their input (see the module
    docstring); returns how many groups were formed. A module's class becomes a subclass of
    peft's LoRA Linear whose forward falls back to peft's whenever fusing does not apply."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if not all(type(m) is Linear for m in members):
                continue
            group = _Group(members)
            for m in members:
                m.__class__ = _fused_class(Linear)
                m._posttrain_group = group
            n += 1
    return n
