"""Data-parallel fitting under torchrun: each rank holds a share of every batch, sums travel by
torch.distributed, and the result is the one-process fit's.

`torchrun --nproc-per-node 2 -m probkit fit SPEC` starts one process per rank with RANK,
WORLD_SIZE, LOCAL_RANK and a rendezvous in its environment; `collective_from_env` joins the
process group (NCCL on GPUs, gloo on CPUs). The objective is a sum over images plus the log
prior, so a rank computes its images' part, the prior is counted on rank 0 only, and summing the
losses and gradients over ranks gives exactly the one-process loss and gradient: every rank then
takes the same optimiser step and the params never drift apart. EM sums its sufficient
statistics instead; held-out metrics sum NLLs over disjoint shares, so no image is counted twice.

Every rank draws the same global batch (the same seeded order and noise as one process) and keeps
its contiguous share, so a fit's numbers do not depend on how many ranks computed them, up to the
order of float additions. A `Local` collective (one process) does nothing at all.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from probkit.errors import ProbkitError, UsageError
from probkit.infer.objective import Batch


class Local:
    """One process: every collective operation is the identity."""

    rank = 0
    world_size = 1
    is_main = True

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        pass

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def share(self, batch: Batch) -> Batch:
        return batch

    def bounds(self, n: int) -> tuple[int, int]:
        """The rows low..high of n that are this rank's contiguous share (all of them here)."""
        return 0, n

    def agree(self, error: BaseException | None) -> None:
        if error is not None:
            raise error

    def barrier(self) -> None:
        pass

    def from_main(self, compute):
        """`compute()`'s text (at most 64 ASCII characters), computed on rank 0 only and received
        by every rank: a large source's digest is hashed once, not once per rank."""
        return compute()


MAIN_TEXT_BYTES = 64


class Ranks(Local):
    """The ranks of a torchrun launch, joined by torch.distributed."""

    def __init__(self, rank: int, world_size: int, device: torch.device | str = "cpu"):
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        self.device = torch.device(device)  # where its collectives' tensors live (NCCL: a GPU)
        self._shared: tuple | None = None  # (the batch's images, this rank's share): a fixed batch is cut once

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum each param's gradient over the ranks (one flat all-reduce; a missing one counts 0)."""
        if not params:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        start = 0
        for p, g in zip(params, grads):
            size = g.numel()
            p.grad = flat[start : start + size].reshape(g.shape).clone()
            start += size

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors`, in place on every rank."""
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def share(self, batch: Batch) -> Batch:
        """This rank's contiguous share of the global batch; the scale N / global batch stays, and
        the prior is counted on rank 0 only. A streamed batch comes already cut (`shared`)."""
        if batch.shared:
            return replace(batch, prior_weight=1.0 if self.is_main else 0.0)
        if self._shared is not None and self._shared[0] is batch.x:
            x, labels = self._shared[1]
        else:
            x = torch.tensor_split(batch.x, self.world_size)[self.rank]
            labels = None if batch.labels is None else torch.tensor_split(batch.labels, self.world_size)[self.rank]
            self._shared = (batch.x, (x, labels))
        return replace(batch, x=x, labels=labels, prior_weight=1.0 if self.is_main else 0.0)

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share of n rows, cut as torch.tensor_split cuts them (the first
        n % world_size ranks take one more)."""
        base, extra = divmod(n, self.world_size)
        low = self.rank * base + min(self.rank, extra)
        return low, low + base + (self.rank < extra)

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank when any rank failed (the first failing rank's error), so no rank
        waits forever in a collective its peer never reaches."""
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, None if error is None else (type(error).__name__, str(error),
                                                                      getattr(error, "exit_code", 1)))
        failures = [(rank, g) for rank, g in enumerate(gathered) if g is not None]
        if not failures:
            return
        if error is not None:
            raise error
        rank, (kind, message, code) = failures[0]
        failure = ProbkitError(f"rank {rank} failed ({kind}): {message}")
        failure.exit_code = code
        raise failure

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def from_main(self, compute):
        """Rank 0 computes the text and broadcasts it as bytes in a tensor (nothing is pickled);
        when rank 0 fails, every other rank fails too, with a message naming rank 0."""
        import torch.distributed as dist

        buffer = torch.zeros(MAIN_TEXT_BYTES + 1, dtype=torch.uint8)  # [status, text...]
        error = None
        if self.is_main:
            try:
                text = compute()
                data = text.encode("ascii")
                if len(data) > MAIN_TEXT_BYTES:
                    raise ValueError(f"from_main carries at most {MAIN_TEXT_BYTES} bytes, got {len(data)}")
                buffer[0] = 1
                buffer[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
            except Exception as exc:  # noqa: BLE001 - raised below, once the others know
                error = exc
        buffer = buffer.to(self.device)
        dist.broadcast(buffer, src=0)
        if error is not None:
            raise error
        buffer = buffer.cpu()
        if int(buffer[0]) != 1:
            failure = ProbkitError("rank 0 failed while loading the data; its message says why")
            failure.exit_code = 1
            raise failure
        return bytes(buffer[1:].tolist()).rstrip(b"\0").decode("ascii")


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process with more than one rank."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Whether this process speaks for the launch: a plain process, or rank 0 under torchrun."""
    where = launched()
    return where is None or where[0] == 0


def restarted() -> bool:
    """Whether torchrun restarted this process after a rank failed (`--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def collective_from_env(device: torch.device) -> Local:
    """The collective of this process: the torchrun process group (joined here, NCCL when the
    device is a GPU, gloo otherwise), or `Local` for a plain one-process run."""
    where = launched()
    if where is None:
        return Local()
    import torch.distributed as dist

    rank, world, _ = where
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, store=_store(rank, world), rank=rank, world_size=world)
    if dist.get_world_size() != world:
        raise UsageError(f"WORLD_SIZE is {world}, but the process group has {dist.get_world_size()} ranks")
    return Ranks(rank, world, device)


def leave() -> None:
    """Leave the process group together, at the end of a command on every rank (its error paths
    too): a barrier first, so no rank tears down its connections while a peer still writes the run
    or waits in a collective (gloo then aborts the early rank at exit: "terminate called without an
    active exception", SIGABRT), then `destroy_process_group`, which joins gloo's threads. Nothing
    to do outside torchrun. A failing barrier (a peer already gone) does not hide the command's own
    outcome."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - a peer that died is torchrun's to report; leave all the same
        pass
    finally:
        dist.destroy_process_group()


def _store(rank: int, world: int):
    """The rendezvous store of this launch, its keys under a prefix of its own attempt: after a
    restart (`--max-restarts`), torchrun's agent store still holds the failed attempt's addresses,
    and a rank that read them would wait for a peer that is gone."""
    from datetime import timedelta

    import torch.distributed as dist

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    try:
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise UsageError("a data-parallel launch needs MASTER_ADDR and MASTER_PORT (torchrun sets them)") from None
    store = dist.TCPStore(address, port, world, is_master=not agent and rank == 0, timeout=timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"probkit/attempt-{attempt}", store)


def distributed_device(device: str) -> str:
    """`--device auto` under torchrun: this rank's GPU (cuda:LOCAL_RANK) where there are GPUs."""
    where = launched()
    if where is None or device not in ("auto", "cuda"):
        return device
    if torch.cuda.is_available():
        return f"cuda:{where[2] % torch.cuda.device_count()}"
    return device
