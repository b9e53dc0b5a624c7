"""Paged AdamW: AdamW (Loshchilov & Hutter, 2019, Algorithm 2) whose two state tensors live in fixed-size pages.

The update is Adam's (Kingma & Ba, 2015, Algorithm 1, eqs. 1-5 of notebook 07) with the weight decay taken out of
the gradient and applied to the weights directly (decoupled weight decay, eq. 6). Every element of the update needs
only its own weight, gradient and two state values, so the states can be cut into pages that live in a host pool
and visit the compute device a few at a time, as QLoRA's paged optimizers do (Dettmers et al., 2023, section 2):
at most `resident_bytes` of pages sit on the device, the least recently used page is evicted (written back first
when it changed), and the pages needed next are prefetched.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch


def adamw_update_(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step (eqs. 1-6), in place, on matching slices of a parameter, its gradient and its two states.

    step is the 1-based number of this update; it sets the bias corrections (eqs. 3-4). The operations and their
    order are torch.optim.AdamW's, so both give the same bits on the same input.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)  # eq. 6: decay the weight itself, not the gradient
    exp_avg.lerp_(grad, 1 - beta1)  # eq. 1: m <- beta1 m + (1 - beta1) g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # eq. 2: v <- beta2 v + (1 - beta2) g^2
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)  # eq. 5


@dataclass
class PagingStats:
    """What a Pager did: pages copied in (prefetches among them) and written back, evictions, bytes copied, and
    the bytes of pages on the device now and at the most."""

    page_ins: int = 0
    prefetches: int = 0
    page_outs: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0


class Pager:
    """Fixed-size pages in a host pool, at most `capacity` of them resident on `device` at once.

    page(i) makes page i resident, copying it in (after evicting the least recently used page if the device is
    full), and hands out its device copy, which from then on counts as dirty: evicting it writes it back first.
    prefetch(ids, keep) copies pages in ahead of their use, but only if that needs no page of `keep` evicted.
    On CUDA the host pool is pinned and every copy runs on a side stream, so a prefetch overlaps the compute.
    """

    def __init__(self, n_pages, page_bytes, capacity, device):
        self.device = torch.device(device)
        self.page_bytes = page_bytes
        self.capacity = capacity
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(n_pages, page_bytes, dtype=torch.uint8, pin_memory=cuda)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.resident = OrderedDict()  # page id -> its device copy, least recently used first
        self.dirty = set()
        self.stats = PagingStats()

    def page(self, i, keep=()):
        """The device copy of page i (paged in if needed, evicting no page of keep), now most recently used."""
        if i not in self.resident:
            self._page_in(i, keep)
        self.resident.move_to_end(i)
        self.dirty.add(i)
        return self.resident[i]

    def prefetch(self, ids, keep=()):
        """Start copying in the pages of ids that are not resident, if that leaves every page of keep resident."""
        protect = set(keep) | set(ids)
        if len(protect) > self.capacity:
            return
        for i in ids:
            if i not in self.resident:
                self._page_in(i, protect)
                self.stats.prefetches += 1

    def ready(self):
        """Make the compute wait for the copies issued so far (on CPU they are done already)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def evict(self, i):
        """Drop page i from the device, writing it back to the host pool first if it may have changed."""
        if i in self.dirty:
            self._write_back(i)
        del self.resident[i]
        self.stats.evictions += 1
        self.stats.resident_bytes = len(self.resident) * self.page_bytes

    def set_capacity(self, capacity):
        """Change how many pages may be resident, evicting the least recently used ones beyond it."""
        self.capacity = capacity
        while len(self.resident) > capacity:
            self.evict(next(iter(self.resident)))

    def flush(self):
        """Write every dirty page back (they stay resident), so the host pool holds the current values."""
        for i in list(self.dirty):
            self._write_back(i)
        if self.stream is not None:
            self.stream.synchronize()

    def read(self, first, count):
        """Pages first..first+count-1 of the host pool, flushed, as one flat byte tensor (a copy)."""
        self.flush()
        return self.host[first : first + count].reshape(-1).clone()

    def write(self, first, data):
        """Store the flat byte tensor data in the host pool from page first on; no page may be resident."""
        flat = self.host.view(-1)
        start = first * self.page_bytes
        flat[start : start + data.numel()].copy_(data)

    def clear(self):
        """Forget every resident page and zero the host pool (fresh states read as zeros)."""
        if self.stream is not None:
            self.stream.synchronize()
        self.resident.clear()
        self.dirty.clear()
        self.host.zero_()
        self.stats.resident_bytes = 0

    def _page_in(self, i, keep):
        while len(self.resident) >= self.capacity:
            self.evict(next(j for j in self.resident if j not in keep))
        frame = torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)
        self._copy(frame, self.host[i])
        self.resident[i] = frame
        self.stats.page_ins += 1
        self.stats.resident_bytes = len(self.resident) * self.page_bytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)

    def _write_back(self, i):
        self._copy(self.host[i], self.resident[i])
        self.dirty.discard(i)
        self.stats.page_outs += 1

    def _copy(self, dst, src):
        if self.stream is None:
            dst.copy_(src)
        else:
            # After the compute queued so far (which may still touch this page), on the side stream.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
            (dst if dst.is_cuda else src).record_stream(self.stream)
        self.stats.bytes_moved += src.numel() * src.element_size()


def _require(ok, message):
    if not ok:
        raise ValueError(message)


def _is_number(x):
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_group(group):
    """Clear errors for hyperparameters AdamW cannot use."""
    lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    _require(_is_number(lr) and lr >= 0, f"lr must be a number >= 0, got {lr!r}: pass a learning rate like 1e-3")
    _require(
        isinstance(betas, tuple | list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
        f"betas must be two numbers in [0, 1), got {betas!r}: pass e.g. betas=(0.9, 0.999)",
    )
    _require(_is_number(eps) and eps >= 0, f"eps must be a number >= 0, got {eps!r}: pass e.g. eps=1e-8")
    _require(
        _is_number(weight_decay) and weight_decay >= 0,
        f"weight_decay must be a number >= 0, got {weight_decay!r}: pass e.g. 0.01, or 0 for plain Adam",
    )
    _require(
        not group.get("amsgrad") and not group.get("maximize"),
        "PagedAdamW implements plain AdamW: amsgrad and maximize must be False",
    )


def _check_pages(params, page_bytes):
    """Clear errors for parameters and page sizes the pager cannot hold."""
    _require(
        isinstance(page_bytes, int) and not isinstance(page_bytes, bool) and page_bytes > 0,
        f"page_bytes must be a positive int, got {page_bytes!r}: pass e.g. page_bytes=2**20 (1 MiB)",
    )
    for p in params:
        _require(
            p.is_floating_point(),
            f"PagedAdamW updates floating-point parameters, got one of dtype {p.dtype}: leave it out of params",
        )
        _require(p.is_contiguous(), "PagedAdamW needs contiguous parameters: make the parameter contiguous first")
        _require(
            page_bytes % p.element_size() == 0,
            f"page_bytes={page_bytes} is not a multiple of the {p.element_size()}-byte elements of a {p.dtype} "
            f"parameter: pick a multiple of {p.element_size()}, e.g. a power of two",
        )
    devices = {p.device for p in params}
    _require(len(devices) == 1, f"all parameters must be on one device, got {sorted(map(str, devices))}")


def _check_budget(page_bytes, resident_bytes):
    """Clear errors for a resident budget that cannot hold the pages one update needs."""
    if resident_bytes is not None:
        _require(
            isinstance(resident_bytes, int) and not isinstance(resident_bytes, bool),
            f"resident_bytes must be an int or None, got {resident_bytes!r}",
        )
        _require(
            resident_bytes >= 2 * page_bytes,
            f"resident_bytes={resident_bytes} is less than one page for each of the two states (exp_avg, "
            f"exp_avg_sq): pass at least 2 * page_bytes = {2 * page_bytes}, or a smaller page_bytes",
        )


class PagedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW with its states (exp_avg, exp_avg_sq) in pages, at most resident_bytes of them on the device.

    page_bytes: the size of a page, a multiple of every parameter's element size. Each parameter owns whole pages
    (its last page may be partly used), one run for exp_avg and one for exp_avg_sq.
    resident_bytes: the most bytes of pages on the device at once (None: all of them); at least two pages, since an
    update needs the exp_avg page and the exp_avg_sq page of the same elements. Change it between steps with
    `optimizer.resident_bytes = n` (e.g. when activations need the memory); `optimizer.stats` counts the paging.
    state_dict() has torch.optim.AdamW's format, so either optimizer can load the other's.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        page_bytes=2**20,
        resident_bytes=None,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        params = [p for group in self.param_groups for p in group["params"]]
        _check_pages(params, page_bytes)
        _check_budget(page_bytes, resident_bytes)
        self.page_bytes = page_bytes
        self._layout = {}  # parameter -> (first exp_avg page, first exp_avg_sq page, pages per state)
        n_pages = 0
        for p in params:
            count = -(-p.numel() * p.element_size() // page_bytes)
            self._layout[p] = (n_pages, n_pages + count, count)
            n_pages += 2 * count
        self._n_pages = n_pages
        self._pager = Pager(n_pages, page_bytes, self._capacity(resident_bytes), params[0].device)

    def add_param_group(self, param_group):
        if hasattr(self, "_pager"):
            raise NotImplementedError(
                "PagedAdamW sizes its page pool when it is built: pass every parameter group to the constructor"
            )
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @property
    def stats(self):
        """Page-ins, prefetches, page-outs, evictions, bytes moved, resident and peak resident bytes."""
        return self._pager.stats

    @property
    def resident_bytes(self):
        return self._pager.capacity * self.page_bytes

    @resident_bytes.setter
    def resident_bytes(self, value):
        _check_budget(self.page_bytes, value)
        self._pager.set_capacity(self._capacity(value))

    def _capacity(self, resident_bytes):
        return max(self._n_pages, 2) if resident_bytes is None else resident_bytes // self.page_bytes

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = list(self._work())
        for k, (param, grad, group, step, m, v, lo, hi) in enumerate(work):
            m_page = self._pager.page(m, keep=(m, v))
            v_page = self._pager.page(v, keep=(m, v))
            self._pager.ready()
            if k + 1 < len(work):
                self._pager.prefetch(work[k + 1][4:6], keep=(m, v))  # copies in while this page computes
            beta1, beta2 = group["betas"]
            adamw_update_(
                param[lo:hi],
                grad[lo:hi],
                m_page.view(param.dtype)[: hi - lo],
                v_page.view(param.dtype)[: hi - lo],
                step,
                group["lr"],
                beta1,
                beta2,
                group["eps"],
                group["weight_decay"],
            )
        return loss

    def _work(self):
        """Yield one update per page: (flat param, flat grad, group, step, exp_avg page, exp_avg_sq page, lo, hi)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                _require(not p.grad.is_sparse, "PagedAdamW does not support sparse gradients: use dense ones")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                state["step"] += 1
                first_m, first_v, count = self._layout[p]
                per_page = self.page_bytes // p.element_size()
                flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
                for j in range(count):
                    lo, hi = j * per_page, min((j + 1) * per_page, p.numel())
                    yield flat_p, flat_g, group, state["step"].item(), first_m + j, first_v + j, lo, hi

    def state_dict(self):
        """torch.optim.AdamW's state_dict: per parameter step, exp_avg and exp_avg_sq (read back from the pages)."""
        saved = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, state in saved["state"].items():
            p = params[index]
            first_m, first_v, count = self._layout[p]
            saved["state"][index] = {
                "step": state["step"].clone(),
                "exp_avg": self._read_state(p, first_m, count),
                "exp_avg_sq": self._read_state(p, first_v, count),
            }
        return saved

    def _read_state(self, p, first, count):
        data = self._pager.read(first, count)
        return data.view(p.dtype)[: p.numel()].view_as(p).to(p.device)

    def load_state_dict(self, state_dict):
        for group in state_dict["param_groups"]:
            _check_group(group)
        self._pager.clear()
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            _require(
                set(state) == {"step", "exp_avg", "exp_avg_sq"},
                f"an AdamW state has the keys step, exp_avg and exp_avg_sq, got {sorted(state)}: "
                "load a state_dict saved by PagedAdamW or torch.optim.AdamW (amsgrad=False)",
            )
            state["step"] = torch.tensor(float(state["step"]))  # a fresh tensor, not the loaded dict's
            first_m, first_v, _ = self._layout[p]
            for first, key in ((first_m, "exp_avg"), (first_v, "exp_avg_sq")):
                self._pager.write(first, state.pop(key).detach().cpu().contiguous().view(-1).view(torch.uint8))
