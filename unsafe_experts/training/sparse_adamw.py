"""AdamW over selected rows of parameters: fp32 master rows and state for those rows only.

Rows are dim-0 slices: experts of a fused expert tensor, or all rows of a router weight. An
unselected row is never written, so unselected experts stay bit-identical whatever the weight
decay or momentum; optimizer memory scales with the number of selected experts; and bf16
models still receive updates that would round away if applied in bf16 state. A parameter
sharded by fully_shard is handled on this rank's own rows: the state of a selected expert lives
on the rank that holds it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..models.distributed import sum_
from ..models.sharding import local, local_rows

ROWS_AT_ONCE = 4  # rows (experts) stepped at once: bounds a step's temporaries (_step_rows)


@dataclass
class _RowState:
    param: torch.nn.Parameter
    rows: torch.Tensor  # indices into dim 0 of this rank's part of param
    start: int  # the global row index of this rank's first row
    master: torch.Tensor  # fp32 copy of param[rows]
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # per row: rows can join at different times


class SparseRowAdamW:
    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state: dict[int, _RowState] = {}
        self._rows_grad: dict[int, torch.Tensor] = {}  # compact gradients (see compact_grads)
        # sharded parameters none of whose tracked rows this rank holds: gradients only dropped
        self._idle: dict[int, torch.nn.Parameter] = {}
        # set before a backward that is the step's only one (one process, every row stepped):
        # each tensor's rows are then stepped the moment its gradient is complete, so no
        # tensor's gradient outlives its own hook (see compact_grads)
        self.step_in_backward = False
        self._stepped: set[int] = set()

    def add_rows(self, param: torch.nn.Parameter, rows) -> None:
        """Start tracking `rows` of `param` (rows already tracked keep their state)."""
        start, stop = local_rows(param)
        rows = torch.as_tensor(sorted(set(int(r) - start for r in rows if start <= int(r) < stop)),
                               dtype=torch.long)
        old = self.state.get(id(param))
        if old is not None:
            rows = rows[~torch.isin(rows, old.rows.cpu())]
        if not len(rows):
            if old is None:
                self._idle[id(param)] = param
            return
        self._idle.pop(id(param), None)
        rows = rows.to(param.device)
        master = local(param.detach())[rows].float()
        new = _RowState(param, rows, start, master, torch.zeros_like(master), torch.zeros_like(master),
                        torch.zeros(len(rows), device=param.device))
        if old is not None:
            new = _RowState(param, torch.cat([old.rows, new.rows]), start,
                            *(torch.cat([getattr(old, f), getattr(new, f)])
                              for f in ("master", "exp_avg", "exp_avg_sq", "step")))
        self.state[id(param)] = new

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.state.values()
                   for t in (s.master, s.exp_avg, s.exp_avg_sq))

    @torch.no_grad()
    def step(self, active: dict[int, list[int]] | None = None) -> None:
        """One AdamW step on every tracked row, or only on `active[id(param)]` rows (rows
        already stepped during backward are not stepped again)."""
        for key, s in self.state.items():
            compact = self._rows_grad.get(key)
            if key in self._stepped or (s.param.grad is None and compact is None):
                continue
            if active is None:
                pos = None
            else:
                wanted = torch.as_tensor(active.get(key, []), dtype=torch.long,
                                         device=s.rows.device) - s.start
                pos = torch.isin(s.rows, wanted).nonzero().flatten()
                if not len(pos):
                    continue
            if pos is None:
                self._step_rows(s, lambda lo, hi, compact=compact, s=s: compact[lo:hi] if compact is not None
                                else local(s.param.grad)[s.rows[lo:hi]].float())
                continue
            grad = compact[pos] if compact is not None else local(s.param.grad)[s.rows[pos]].float()
            self._update(s, grad, pos)

    def _step_rows(self, s: _RowState, grad_of) -> None:
        """Every tracked row of s, ROWS_AT_ONCE at a time, updated in the state itself (views:
        no copy of the master and the moments); grad_of(lo, hi) is the fp32 gradient of tracked
        rows lo:hi. The step's temporaries are then a few rows' worth, not every selected
        expert's of the tensor (at k = 100 of OLMoE-1B-7B's experts one layer can hold 30 of
        them: gigabytes beside the model). Elementwise arithmetic, so the same bits."""
        for lo in range(0, len(s.rows), ROWS_AT_ONCE):
            hi = min(lo + ROWS_AT_ONCE, len(s.rows))
            self._update(s, grad_of(lo, hi), slice(lo, hi))

    def _update(self, s: _RowState, grad: torch.Tensor, pos: slice | torch.Tensor) -> None:
        """AdamW on tracked rows `pos` of s from their fp32 gradient, written into the parameter:
        a slice updates the state in place (views); an index tensor (a subset) through copies."""
        beta1, beta2 = self.betas
        view = isinstance(pos, slice)
        w, m, v = s.master[pos], s.exp_avg[pos], s.exp_avg_sq[pos]
        t = s.step[pos].add_(1) if view else s.step[pos] + 1
        shape = (-1,) + (1,) * (w.dim() - 1)
        w.mul_(1 - self.lr * self.weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = (self.lr / (1 - beta1 ** t)).view(shape)
        denom = v.sqrt().div_((1 - beta2 ** t).sqrt().view(shape)).add_(self.eps)
        w.addcdiv_(m * step_size, denom, value=-1)
        del denom
        if not view:
            s.master[pos], s.exp_avg[pos], s.exp_avg_sq[pos], s.step[pos] = w, m, v, t
        local(s.param).index_copy_(0, s.rows[pos], w.to(s.param.dtype))

    def sum_grads_across_ranks(self) -> None:
        """Data parallelism: the (compact) gradients of the tracked rows, summed over ranks."""
        for key, s in self.state.items():
            grad = self._rows_grad.get(key, s.param.grad)
            if grad is not None:
                sum_(grad)

    def zero_grad(self) -> None:
        self._rows_grad.clear()
        self._stepped.clear()
        for param in [s.param for s in self.state.values()] + list(self._idle.values()):
            param.grad = None

    @contextmanager
    def compact_grads(self):
        """While active, each tracked parameter's gradient is cut down to the tracked rows (in
        fp32) the moment backward produces it, and the full gradient is freed: gradient memory
        scales with the selected experts, not with every expert of every layer. A sharded
        parameter's hook runs after fully_shard has summed its gradient across the ranks.

        With `step_in_backward` set, the rows are stepped in the hook instead of kept: the same
        update (the hook runs once the tensor's gradient is complete, after the last backward
        node that reads the tensor), without holding every trained row's fp32 gradient until
        the step, 4 bytes per trained parameter (2.3 GiB at k = 100 of OLMoE-1B-7B's experts,
        what a whole round needs to fit 24 GiB; docs/scale.md)."""
        def hook_for(key, rows):
            def hook(param):
                if rows is not None and self.step_in_backward:
                    grad, state = local(param.grad), self.state[key]
                    with torch.no_grad():
                        self._step_rows(state, lambda lo, hi: grad.index_select(0, state.rows[lo:hi]).float())
                    self._stepped.add(key)
                elif rows is not None:
                    part = local(param.grad).index_select(0, rows).float()
                    # several backwards before a step (micro-batches) add up, as .grad would
                    held = self._rows_grad.get(key)
                    self._rows_grad[key] = part if held is None else held.add_(part)
                param.grad = None
            return hook

        handles = [s.param.register_post_accumulate_grad_hook(hook_for(key, s.rows))
                   for key, s in self.state.items()]
        handles += [p.register_post_accumulate_grad_hook(hook_for(key, None))
                    for key, p in self._idle.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
