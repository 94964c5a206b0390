"""Data-parallel training on torch.distributed: which rank am I, my share of a batch, agreeing on decisions.

Started by `torchrun` (or `seqtool train --nproc N`, which calls it): torchrun sets RANK and
WORLD_SIZE, and every rank runs the same trainer. All ranks build the same global batches from the
same seed; each takes every world-th sentence of a batch, and DistributedDataParallel averages the
gradients. Rank 0 alone validates, logs and writes files, and tells the others what it decided.
With one process (no torchrun) every function here is a no-op, so the single-process path is
exactly the plain one.

A rank that stops on a user error leaves it in the launcher's key-value store before it exits; a rank
that then loses contact with it (a collective fails) reports that error, not a network one. When
torchrun restarts the workers after one died (`--max-restarts`), TORCHELASTIC_RESTART_COUNT says so
and TORCHELASTIC_RUN_ID names the job, so that they resume from its own last checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional, TypeVar, cast

import torch
import torch.distributed as dist

from seqtool.errors import SeqtoolError

if TYPE_CHECKING:
    from seqtool.config import Config

T = TypeVar("T")

# How gloo says, in a RuntimeError, that the other end of a connection is gone: while connecting the ranks
# (refused), or in an exchange (closed, reset, broken pipe).
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Connection refused")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    group: Any = field(default=None, compare=False)  # CPU (gloo) group for decisions when NCCL moves gradients
    store: Any = field(default=None, compare=False)  # the launcher's key-value store: where a failing rank says why

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates, logs and writes."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def init_from_env(cuda: bool = False) -> Ranks:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA);
    one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    # Rank 0 validates while the others wait in a broadcast: allow long validations.
    timeout = timedelta(hours=2)
    rank = int(os.environ["RANK"])
    store = _attempt_store(rank, world, timeout)
    try:
        dist.init_process_group(backend="nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timeout)
    except RuntimeError as exc:
        if not PEER_GONE.search(str(exc)):
            raise
        raise SeqtoolError(f"rank {rank} could not connect to the other ranks of this job (one stopped as it "
                           f"started, or the network between them is closed: see docs/scaling.md)") from None
    # Decisions and counters are small CPU values: with NCCL they travel in a gloo group of their own.
    group = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    return Ranks(rank, world, group, store)


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The key-value store the ranks meet in (as init_process_group's env:// makes it: torchrun's agent hosts
    it, or rank 0 without one), its keys kept apart per attempt: the agent's store outlives a restart, and a
    restarted rank that read a dead rank's address from the attempt before could not connect to it."""
    host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=host,
                          timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"seqtool/attempt{restarts()[0]}", store)


def restarts() -> tuple[int, int]:
    """(restarts so far, restarts allowed) of this job's workers under torchrun's elastic agent; (0, 0) otherwise."""
    env = os.environ
    return int(env.get("TORCHELASTIC_RESTART_COUNT") or 0), int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0)


def job_id() -> str:
    """The launcher's id of this job (torchrun's --rdzv-id; a fresh one with --standalone or `seqtool train
    --nproc`), saved with each checkpoint so that restarted workers know their own job's; '' without one, and
    for torchrun's default id 'none', which every job shares."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return "" if run_id == "none" else run_id


def _error_key(rank: int) -> str:
    return f"error/rank{rank}"


def leave_error(exc: SeqtoolError, ranks: Ranks) -> None:
    """Before this rank stops on `exc`: leave it where the others look when they lose contact with this rank."""
    if ranks.store is None:
        return
    try:
        ranks.store.set(_error_key(ranks.rank), json.dumps([exc.exit_code, str(exc)]))
    except (RuntimeError, ValueError):  # the store went with its host: the others learn only that this rank stopped
        pass


def lost_contact(exc: BaseException, ranks: Ranks) -> bool:
    """`exc` is a collective that failed because another rank is gone."""
    return ranks.parallel and isinstance(exc, RuntimeError) and bool(PEER_GONE.search(str(exc)))


def error_left(ranks: Ranks) -> Optional[SeqtoolError]:
    """The user error another rank left before it stopped, if one did (the lowest rank's, if several)."""
    for rank in range(ranks.world):
        if rank == ranks.rank or ranks.store is None:
            continue
        try:
            if not ranks.store.check([_error_key(rank)]):
                continue
            code, message = json.loads(ranks.store.get(_error_key(rank)))
        except (RuntimeError, ValueError):  # no store to ask any more
            return None
        error = SeqtoolError(message)
        error.exit_code = code
        return error
    return None


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """With several ranks on CUDA, each takes the GPU torchrun gives it (LOCAL_RANK)."""
    if device.type != "cuda" or not ranks.parallel:
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


def shutdown(ranks: Ranks) -> None:
    if ranks.parallel and dist.is_initialized():
        dist.destroy_process_group()


def my_share(idx: Sequence[int], ranks: Ranks) -> tuple[list[int], bool]:
    """This rank's sentences of a global batch -> (indices, real). A batch with fewer sentences than
    ranks gives the short ranks a stand-in sentence (real=False) whose loss is weighted 0."""
    share = list(idx[ranks.rank :: ranks.world])
    return (share, True) if share else ([idx[0]], False)


def all_reduce(values: list[float], ranks: Ranks, op: str = "sum") -> list[float]:
    """Element-wise sum or max of `values` over all ranks (as given, with one process)."""
    if not ranks.parallel:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=ranks.group)
    return t.tolist()


def from_main(obj: T, ranks: Ranks) -> T:
    """Rank 0's `obj` on every rank (any picklable value made by this program, never read from a file)."""
    if not ranks.parallel:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0, group=ranks.group)
    return box[0]


def main_does(fn: Callable[[], T], ranks: Ranks) -> T:
    """Run `fn` on rank 0 only and hand its result, or the user error it raised, to every rank."""
    if not ranks.parallel:
        return fn()
    result, error = None, None
    if ranks.main:
        try:
            result = fn()
        except SeqtoolError as exc:
            error = exc
    result, error = from_main((result, error), ranks)
    if error is not None:
        raise error
    return cast(T, result)  # error is None: rank 0's fn() returned it


def launch(nproc: int, cfg: Config, flags: Sequence[str], max_restarts: int = 0) -> int:
    """`seqtool train --nproc N ...`: run `seqtool train -c RESOLVED FLAGS` in N local processes through torch's
    elastic launcher (what torchrun --standalone does), RESOLVED being `cfg` as the command resolved it, so each
    worker trains exactly that; when a worker dies, all are started again up to `max_restarts` times (they
    resume from the last checkpoint). Returns the exit code of the first failing rank, or 0.

    The workers print their own errors (rank 0 only); the launcher's own logging is kept quiet.
    """
    import logging
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from seqtool.config import dump_config

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.5)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N processes share the cores
    with tempfile.TemporaryDirectory(prefix="seqtool-launch-") as tmp:
        resolved = os.path.join(tmp, "config.yaml")
        with open(resolved, "w", encoding="utf-8") as f:
            f.write(dump_config(cfg))
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "seqtool", "train", "-c", resolved, *flags)
        except ChildFailedError as exc:
            codes = [f.exitcode for f in exc.failures.values()]
            return next((c for c in codes if c and c > 0), 1)
    return 0
