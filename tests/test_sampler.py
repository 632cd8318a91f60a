"""P x K identity sampler: batch structure, replacement, determinism, DDP slicing, length."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from trainer.sampler import DistributedIdentitySampler, RandomIdentitySampler, identity_batches

# 10 identities with 1..19 images (pid 100+i has 2i+1 images), interleaved order.
PIDS = [100 + i for i in range(10) for _ in range(2 * i + 1)]
P, K = 4, 3


def batches_of(sampler, size):
    idx = list(sampler)
    assert len(idx) % size == 0
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def test_every_batch_is_p_distinct_ids_times_k():
    s = RandomIdentitySampler(PIDS, P, K, seed=1)
    batches = batches_of(s, P * K)
    assert len(batches) >= 2
    for b in batches:
        counts = Counter(PIDS[i] for i in b)
        assert len(counts) == P and set(counts.values()) == {K}
        # chunks are contiguous: K indices of one identity, then the next identity
        for c in range(P):
            assert len({PIDS[i] for i in b[c * K : (c + 1) * K]}) == 1


def test_small_identities_sampled_with_replacement_and_large_without():
    s = RandomIdentitySampler(PIDS, P, K, seed=2)
    per_pid: Counter[int] = Counter()
    for b in batches_of(s, P * K):
        for c in range(P):
            chunk = b[c * K : (c + 1) * K]
            pid = PIDS[chunk[0]]
            n_images = PIDS.count(pid)
            if n_images < K:
                assert set(chunk) <= {i for i, p in enumerate(PIDS) if p == pid}
            else:
                assert len(set(chunk)) == K  # no repeats inside a chunk
            per_pid[pid] += 1
    # without replacement across the epoch for identities with >= K images
    idx = list(s)
    for pid in set(PIDS):
        if PIDS.count(pid) >= K:
            mine = [i for i in idx if PIDS[i] == pid]
            assert len(mine) == len(set(mine))
            assert per_pid[pid] <= PIDS.count(pid) // K
        else:
            assert per_pid[pid] <= 1


def test_single_image_identity_fills_chunk_by_repetition():
    pids = [0] + [1] * 4 + [2] * 4
    s = RandomIdentitySampler(pids, num_identities=3, num_instances=4, seed=0)
    idx = list(s)
    assert len(idx) == 12  # id 0 has one chunk, so exactly one batch of 3 ids
    assert idx.count(0) == 4


def test_deterministic_per_epoch_and_epochs_differ():
    a = RandomIdentitySampler(PIDS, P, K, seed=3)
    b = RandomIdentitySampler(PIDS, P, K, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    e5 = list(a)
    a.set_epoch(6)
    assert list(a) != e5
    c = RandomIdentitySampler(PIDS, P, K, seed=4)
    c.set_epoch(5)
    assert list(c) != e5


def test_state_dict_resume_reproduces_epoch():
    a = RandomIdentitySampler(PIDS, P, K, seed=7)
    a.set_epoch(9)
    state = a.state_dict()
    b = RandomIdentitySampler(PIDS, P, K, seed=0)
    b.load_state_dict(state)
    assert b.epoch == 9 and list(b) == list(a)


@pytest.mark.parametrize("seed", range(5))
def test_len_is_exact(seed):
    s = RandomIdentitySampler(PIDS, P, K, seed=seed)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert len(s) == len(list(s))
        assert len(s) % (P * K) == 0


def test_len_varies_with_draws_which_is_why_it_is_computed():
    # counts of chunks [3, 1, 1] with P=2: 1 or 2 batches depending on the draws.
    pids = [0] * 3 + [1] + [2]
    lengths = set()
    for seed in range(30):
        s = RandomIdentitySampler(pids, num_identities=2, num_instances=1, seed=seed)
        lengths.add(len(s))
        assert len(s) == len(list(s))
    assert lengths >= {2, 4}


def test_distributed_ranks_are_disjoint_and_union_is_global_batch():
    world = 2
    single = RandomIdentitySampler(PIDS, P, K, seed=5)
    single.set_epoch(2)
    global_batches = batches_of(single, P * K)
    locals_ = []
    for r in range(world):
        s = DistributedIdentitySampler(PIDS, P, K, seed=5, num_replicas=world, rank=r)
        s.set_epoch(2)
        assert s.local_batch_size == P * K // world
        assert len(s) == len(single) // world
        locals_.append(batches_of(s, s.local_batch_size))
    for step, gb in enumerate(global_batches):
        parts = [locals_[r][step] for r in range(world)]
        assert set(parts[0]).isdisjoint(parts[1])
        assert parts[0] + parts[1] == gb
        for part in parts:  # whole identities on each rank
            counts = Counter(PIDS[i] for i in part)
            assert len(counts) == P // world and set(counts.values()) == {K}


def test_works_as_dataloader_sampler():
    ds = torch.utils.data.TensorDataset(torch.tensor(PIDS))
    s = RandomIdentitySampler(PIDS, P, K, seed=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=P * K, sampler=s)
    assert len(dl) == len(s) // (P * K)
    for (pids,) in dl:
        assert len(set(pids.tolist())) == P


def test_identity_batches_is_pure():
    assert identity_batches(PIDS, P, K, 0, 1) == identity_batches(PIDS, P, K, 0, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_identities=11), "lower num_identities to at most 10"),
        (dict(num_instances=0), "num_instances"),
        (dict(num_identities=0), "num_identities"),
        (dict(num_replicas=3), "divisible"),
        (dict(num_replicas=2, rank=2), "rank"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomIdentitySampler(PIDS, **{"num_identities": 4, "num_instances": 2, **kwargs})


def test_empty_dataset_and_missing_process_group_raise():
    with pytest.raises(ValueError, match="empty"):
        RandomIdentitySampler([])
    with pytest.raises(ValueError, match="num_replicas"):
        DistributedIdentitySampler(PIDS, P, K)
