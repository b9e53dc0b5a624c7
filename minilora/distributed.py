"""Data-parallel training across processes with torch.distributed: what `tune` needs to know about the others.

`torchrun --nproc_per_node N -m minilora tune ...` starts N processes, each with RANK, WORLD_SIZE and LOCAL_RANK in
its environment. Each builds the same model, trains on its own share of every optimizer step's micro-batches, and
DistributedDataParallel averages the gradients before the optimizer and the rank allocator, so every process
computes the same update, the same importance scores and the same masks (checked at every mask: same_everywhere).
Process 0 alone evaluates, logs and writes. Without torchrun everything here is the single-process case.
"""

import datetime
import os

import torch
import torch.distributed as dist


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def start(device):
    """Join the process group when torchrun started this process (gloo on a CPU, nccl on GPUs; each process its own
    GPU, by LOCAL_RANK); return the device this process computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # process 0 evaluates (a 7B's generation takes minutes) while the others wait in their next collective
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=2))
    return device


def stop():
    if active():
        dist.destroy_process_group()


def on_device(values, dtype=torch.float32):
    """A tensor for a collective: NCCL (GPUs) reduces GPU tensors, gloo (CPUs) CPU ones."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor(values, dtype=dtype, device=device)


def any_rank(flag):
    """True on every process if flag is True on any (so that all stop at the same step)."""
    if not active():
        return flag
    value = on_device([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean(number):
    """The mean of a number over the processes (a loss: each process saw its own micro-batches)."""
    if not active():
        return number
    value = on_device([number], torch.float64)
    dist.all_reduce(value)
    return value.item() / world_size()


def gather(obj):
    """[every process's obj], in rank order."""
    if not active():
        return [obj]
    objects = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def same_everywhere(obj, what):
    """Raise unless obj is equal on every process (the rank pattern after a mask: a difference means the processes'
    gradients or scores diverged, and their adapters with them)."""
    objects = gather(obj)
    differing = [r for r, other in enumerate(objects) if other != objects[0]]
    if differing:
        raise RuntimeError(f"{what} differs between process 0 and process {differing[0]}: the processes' gradients "
                           "were not averaged the same way (is every process running the same code and settings?)")
