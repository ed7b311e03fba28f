"""Several processes under ``torchrun``: which rank this is, its share of the data, and the shares put back.

Nothing needs to change in user code: when the launcher's environment is present (``WORLD_SIZE`` > 1), the
default process group starts on first use (gloo on CPU, nccl on GPU; multi-node is the same code), and
``capture`` / ``extract`` split their texts across ranks and gather the result on every rank, while
``train_sae`` trains data-parallel. Every collective has a timeout (``STEERKIT_DIST_TIMEOUT`` seconds, 600 by
default): a rank that waits longer than that for a failed peer stops with an error saying so, not a hang.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator

import torch


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("STEERKIT_DIST_TIMEOUT", "600")))


def world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` in a single process; under ``torchrun`` starts the process group."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return 0, 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout())
        atexit.register(_leave)
    return dist.get_rank(), dist.get_world_size()


def _leave() -> None:
    """At exit: wait (briefly) for every rank, then take the group down together. A rank that tore its group
    down while a peer still held connections to it could abort in gloo's threads ("terminate called without an
    active exception"); a peer that already failed only costs this wait."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=30), wait_all_ranks=True)
        else:
            dist.barrier()
    dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return world()[0] == 0


def local_device() -> str:
    """The default device of this process: its own GPU under torchrun (``cuda:LOCAL_RANK``), else cuda or cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cuda"


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into an error that says what happened."""
    try:
        yield
    except RuntimeError as err:
        rank, size = world()
        raise RuntimeError(
            f"rank {rank} of {size} lost the other ranks while {what} (timeout {timeout().total_seconds():.0f} s, "
            f"STEERKIT_DIST_TIMEOUT): another rank probably failed, see its output. ({err})"
        ) from err


def all_reduce(tensor: torch.Tensor, op: str = "sum", what: str = "combining results") -> torch.Tensor:
    """``tensor`` reduced over ranks in place (``sum``, ``min`` or ``max``); a no-op in a single process."""
    import torch.distributed as dist

    if world()[1] == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    here = tensor.to(_comm_device())
    with collective(what):
        dist.all_reduce(here, ops[op])
    if here is not tensor:
        tensor.copy_(here)
    return tensor


def broadcast(tensor: torch.Tensor, what: str = "sharing rank 0's values") -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (in place)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return tensor
    here = tensor.to(_comm_device())
    with collective(what):
        dist.broadcast(here, src=0)
    if here is not tensor:
        tensor.copy_(here)
    return tensor


def all_gather(tensor: torch.Tensor, what: str = "gathering results") -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same dtype and trailing shape, any length), in rank order, on every rank."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return [tensor]
    device = _comm_device()
    count = torch.tensor([tensor.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    with collective(what):
        dist.all_gather(counts, count)
        longest = int(max(c.item() for c in counts))
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[: tensor.shape[0]] = tensor.to(device)
        pieces = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(pieces, padded)
    return [piece[: int(c.item())].to(tensor.device) for piece, c in zip(pieces, counts, strict=True)]


def barrier(what: str = "waiting for the other ranks") -> None:
    import torch.distributed as dist

    if world()[1] > 1:
        with collective(what):
            dist.barrier()


def interleave(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """Undo a strided split: rank r held items r, r + W, r + 2W, ...; returns the items in input order."""
    size = len(pieces)
    total = sum(len(piece) for piece in pieces)
    return [pieces[i % size][i // size] for i in range(total)]
