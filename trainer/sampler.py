"""P x K identity sampling: every batch holds P identities with K images each.

An epoch's index sequence is a pure function of ``(seed, epoch, pids, P, K)``:
:meth:`RandomIdentitySampler.set_epoch` chooses the epoch, and resuming needs
nothing more than the seed and the epoch number (:meth:`state_dict`).

Distributed training: every rank builds the same global sequence of P*K
batches and keeps its own P/W identities (whole K-chunks) of each, so ranks
never share an image within a step, and the union of the ranks' batches is the
single-process batch. The global batch is therefore P*K whatever the number of
ranks W: keep the lr of the single-process recipe (3.5e-4 for 16x4). To use
more GPUs with a *larger* global batch, raise P and scale the lr linearly with
P*K/64 (the linear scaling rule; untested for this recipe, warmup helps).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


def identity_batches(
    pids: Sequence[int], num_identities: int, num_instances: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """One epoch of global batches: a list of batches, each a list of P chunks of K dataset indices.

    Per identity, its indices are shuffled and cut into K-chunks (the remainder
    is dropped); an identity with fewer than K images gets one chunk drawn with
    replacement. Then, while at least P identities have chunks left, P distinct
    ones are drawn uniformly and each gives its next chunk. Identities are
    visited in sorted order, so the result does not depend on dict ordering.
    """
    rng = np.random.default_rng([seed, epoch])
    by_pid: dict[int, list[int]] = {}
    for idx, pid in enumerate(pids):
        by_pid.setdefault(int(pid), []).append(idx)
    k = num_instances
    chunks: dict[int, list[list[int]]] = {}
    for pid in sorted(by_pid):
        idxs = np.asarray(by_pid[pid])
        if len(idxs) < k:
            chunks[pid] = [rng.choice(idxs, size=k, replace=True).tolist()]
        else:
            perm = rng.permutation(idxs)
            n = len(perm) // k
            chunks[pid] = [perm[i * k : (i + 1) * k].tolist() for i in range(n)]
    available = sorted(chunks)
    batches: list[list[list[int]]] = []
    while len(available) >= num_identities:
        chosen = rng.choice(len(available), size=num_identities, replace=False)
        batch = []
        for j in chosen:
            batch.append(chunks[available[j]].pop())
        batches.append(batch)
        # Removing after the draw keeps positions in `available` valid above.
        available = [pid for pid in available if chunks[pid]]
    return batches


class RandomIdentitySampler(Sampler[int]):
    """Yields dataset indices in batches of P identities x K instances.

    Args:
        pids: identity of every dataset item (any ints; index i is item i).
        num_identities: P, identities per *global* batch.
        num_instances: K, images per identity per batch.
        seed: base seed; epoch e uses randomness derived from ``(seed, e)``.
        num_replicas, rank: DDP world size and this rank; rank r yields
            identities ``[r*P/W, (r+1)*P/W)`` of every global batch.

    Use with ``batch_size = P*K / num_replicas`` and ``drop_last=False`` (the
    length is always a multiple of the local batch). Call :meth:`set_epoch`
    before each epoch.

    Raises:
        ValueError: no items, K < 1, P < 1, fewer than P identities (lower
            num_identities), P not divisible by num_replicas, or rank out of range.
    """

    def __init__(
        self,
        pids: Sequence[int],
        num_identities: int = 16,
        num_instances: int = 4,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.pids = [int(p) for p in pids]
        if not self.pids:
            raise ValueError("cannot sample identities from an empty dataset")
        if num_instances < 1:
            raise ValueError(f"num_instances (K) must be >= 1, not {num_instances}")
        if num_identities < 1:
            raise ValueError(f"num_identities (P) must be >= 1, not {num_identities}")
        n_ids = len(set(self.pids))
        if n_ids < num_identities:
            raise ValueError(
                f"the dataset has {n_ids} identities but a batch needs num_identities={num_identities}; "
                f"lower num_identities to at most {n_ids}"
            )
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, not {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), not {rank}")
        if num_identities % num_replicas:
            raise ValueError(
                f"num_identities={num_identities} must be divisible by the number of ranks {num_replicas} "
                f"so that every rank gets whole identities"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, not {seed}")
        self.num_identities, self.num_instances = num_identities, num_instances
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        self._cache: tuple[int, list[int]] | None = None

    @property
    def local_batch_size(self) -> int:
        """Indices per batch on this rank: P*K / num_replicas."""
        return self.num_identities // self.num_replicas * self.num_instances

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose sequence :meth:`__iter__` and :meth:`__len__` describe."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        # The number of batches depends on the random draws (identities with
        # many chunks outlive the others), so the exact length needs the
        # sequence itself; cache it per epoch.
        if self._cache is None or self._cache[0] != self.epoch:
            per_rank = self.num_identities // self.num_replicas
            lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
            out: list[int] = []
            for batch in identity_batches(self.pids, self.num_identities, self.num_instances, self.seed, self.epoch):
                for chunk in batch[lo:hi]:
                    out.extend(chunk)
            self._cache = (self.epoch, out)
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._indices()))

    def __len__(self) -> int:
        return len(self._indices())

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs (the sequence is a function of seed and epoch)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "num_identities": self.num_identities,
            "num_instances": self.num_instances,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore seed and epoch; a different P or K only logs a warning (the resume is then not exact)."""
        if (state.get("num_identities"), state.get("num_instances")) != (self.num_identities, self.num_instances):
            log.warning(
                "sampler state was saved with P=%s K=%s, now P=%s K=%s: batches will differ from the original run",
                state.get("num_identities"), state.get("num_instances"), self.num_identities, self.num_instances,
            )
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))


class DistributedIdentitySampler(RandomIdentitySampler):
    """:class:`RandomIdentitySampler` whose world size and rank default to the process group's.

    Raises:
        ValueError: as the base class, or no initialised process group while
            num_replicas/rank are not given.
    """

    def __init__(
        self,
        pids: Sequence[int],
        num_identities: int = 16,
        num_instances: int = 4,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("no initialised torch.distributed process group: pass num_replicas and rank")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        super().__init__(pids, num_identities, num_instances, seed, num_replicas, rank)
