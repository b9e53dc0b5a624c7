"""PagedAdamW's step time relative to torch.optim.AdamW, and the bytes it moves per step, for a few budgets.

Both optimizers update the same LoRA-sized parameters with the same gradients; their steps are timed alternately
in one run (best of several), so the ratio holds up on a busy machine better than either time alone.
Run: .venv/bin/python bench/paged_optim.py
"""

import time

import torch

from minilora.paged_optim import PagedAdamW

SHAPES = [(16, 4096), (4096, 16)] * 8  # 16 LoRA factors of rank 16 on 4096-wide layers: 1M parameters
WARMUP, STEPS = 2, 15


def make_params(device):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device)) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    return params


def timed_step(optimizer, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(page_bytes, budget_pages, device):
    """(torch seconds, paged seconds, bytes moved per step, page-ins per step) for one configuration."""
    reference = torch.optim.AdamW(make_params(device), lr=1e-4)
    resident = None if budget_pages is None else budget_pages * page_bytes
    paged = PagedAdamW(make_params(device), lr=1e-4, page_bytes=page_bytes, resident_bytes=resident)
    for _ in range(WARMUP):
        reference.step()
        paged.step()
    moved, page_ins = paged.stats.bytes_moved, paged.stats.page_ins
    torch_times, paged_times = [], []
    for _ in range(STEPS):
        torch_times.append(timed_step(reference, device))
        paged_times.append(timed_step(paged, device))
    return (
        min(torch_times),
        min(paged_times),
        (paged.stats.bytes_moved - moved) / STEPS,
        (paged.stats.page_ins - page_ins) / STEPS,
    )


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state_bytes = sum(torch.Size(s).numel() for s in SHAPES) * 4
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"{len(SHAPES)} parameters, {state_bytes / 2**20:.1f} MiB per state (exp_avg, exp_avg_sq)\n")
    header = f"{'page':>8} {'budget':>14} {'torch ms':>9} {'paged ms':>9} {'ratio':>6} {'MiB/step':>9} {'page-ins':>9}"
    print(header)
    print("-" * len(header))
    for page_bytes in (2**18, 2**16):
        pages = 2 * state_bytes // page_bytes
        for name, budget_pages in (("all resident", None), ("half", pages // 2), ("1 page/state", 2)):
            torch_s, paged_s, moved, page_ins = measure(page_bytes, budget_pages, device)
            print(
                f"{page_bytes // 1024:>5} KiB {name:>14} {torch_s * 1e3:>9.2f} {paged_s * 1e3:>9.2f} "
                f"{paged_s / torch_s:>6.1f} {moved / 2**20:>9.1f} {page_ins:>9.0f}"
            )
    print("\nratio = paged step time / torch.optim.AdamW step time (same parameters and gradients, one run).")
    print("Everything resident moves no bytes after the first step; a budget below the working set moves every")
    print("page in and out once per step (LRU over a cyclic scan), so half and one page per state move the same.")


if __name__ == "__main__":
    main()
