"""Multi-process training under ``torchrun``: the process group, rank-aware helpers and the per-task DDP module.

``torchrun --nproc_per_node=N -m inflora run ...`` (multi-node: add torchrun's ``--nnodes``, ``--node_rank``,
``--rdzv_endpoint`` ...) starts N processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set;
:func:`init_from_env` joins them (NCCL on CUDA, gloo on CPU). Every rank builds the same experiment, takes its share
of each global training batch and of every no-gradient pass, and all-reduces sums, so all ranks hold identical
models. Only rank 0 writes files. Without ``torchrun`` (or with one process) every helper is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """A process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes logs, results and checkpoints."""
    return rank() == 0


def init_from_env(device: str = "auto") -> bool:
    """Join the process group described by torchrun's environment variables. Returns whether training is
    distributed. ``device`` is ``train.device``: CUDA devices use NCCL (one GPU per local rank), CPU uses gloo."""
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return is_distributed()
    cuda = not device.startswith("cpu") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    return is_distributed()


def shutdown(clean: bool = True) -> None:
    """Leave the process group; ``clean``: after a barrier, so no rank exits while others still talk to it (skipped
    after an error, which may have struck one rank only: torchrun then stops the others)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if clean and is_distributed():
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (returned for convenience)."""
    if is_distributed():
        buf = tensor.to(_comm_device())
        dist.all_reduce(buf)
        if buf is not tensor:
            tensor.copy_(buf)
    return tensor


def gather_pass_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a sharded no-gradient pass (rank ``r`` holds the pass's samples ``r, r + W, r + 2W,
    ...``), on every rank, in the order of the unsharded pass; one process: ``rows`` itself."""
    if not is_distributed():
        return rows
    size, me = world_size(), rank()
    counts = torch.zeros(size, dtype=torch.long)
    counts[me] = len(rows)
    total = int(all_reduce_sum(counts).sum())
    out = rows.new_zeros((total, *rows.shape[1:]))
    out[me::size] = rows
    return all_reduce_sum(out)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Rank ``src``'s ``data`` on every rank (no pickling)."""
    if not is_distributed():
        return data or b""
    device = _comm_device()
    size = torch.tensor([len(data or b"") if rank() == src else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src)
    n = int(size.item())
    if n == 0:
        return b""
    if rank() == src:
        buf = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(buf, src)
    return bytes(buf.cpu().numpy().tobytes())


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only (returns ``None`` elsewhere). If it raises there, every rank raises: rank 0 its
    own exception, the others a :class:`~inflora.config.ConfigError` or :class:`RankError` with the same message, so
    no rank waits forever for the others."""
    from .config import ConfigError

    if not is_distributed():
        return fn()
    result: T | None = None
    error: Exception | None = None
    if is_main():
        try:
            result = fn()
        except Exception as exc:
            error = exc
    note = "" if error is None else f"{'config' if isinstance(error, ConfigError) else 'other'}\0{error}"
    kind, _, message = broadcast_bytes(note.encode() if is_main() else None).decode().partition("\0")
    if error is not None:
        raise error
    if kind:
        raise (ConfigError if kind == "config" else RankError)(message or "rank 0 failed")
    return result


class RankError(ValueError):
    """An error raised on rank 0 (reported there) and re-raised on the other ranks."""
