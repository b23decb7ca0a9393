"""quantlab.distributed outside a process group: sharding covers the batches exactly once."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from quantlab import batching, distributed


def _ids(batches):
    return [b[0][:, 0].tolist() for b in batches]


def _loader(n=23, batch_size=4, **kw):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return DataLoader(TensorDataset(x, x), batch_size=batch_size, **kw)


def test_sequential_loader_is_rebatched_by_index_and_the_ranks_cover_it_once():
    whole = _ids(_loader())
    for world in (2, 3, 7):
        shards = [batching.shard_batches(_loader(), r, world) for r in range(world)]
        assert all(isinstance(s, DataLoader) for s in shards)  # only its own samples are loaded
        got = {}
        for r, shard in enumerate(shards):
            ids = _ids(shard)
            assert len(shard) == len(ids)
            for k, batch in enumerate(ids):
                got[r + k * world] = batch  # batch b goes to rank b % world
        assert [got[b] for b in sorted(got)] == whole


def test_max_batches_counts_the_batches_of_all_ranks_together():
    whole = _ids(_loader())[:5]
    shards = [_ids(batching.shard_batches(_loader(), r, 2, max_batches=5)) for r in range(2)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert _ids(batching.shard_batches(_loader(), 0, 1, max_batches=5)) == whole


def test_drop_last_and_empty_ranks():
    whole = _ids(_loader(drop_last=True))
    assert len(whole) == 5 and all(len(b) == 4 for b in whole)
    shards = [_ids(batching.shard_batches(_loader(drop_last=True), r, 2)) for r in range(2)]
    assert shards[0] + shards[1] == whole[0::2] + whole[1::2]
    assert _ids(batching.shard_batches(_loader(n=4), 1, 2)) == []  # one batch, two ranks


def test_other_iterables_are_walked_and_skipped():
    batches = [(torch.full((2, 1), float(i)), None) for i in range(7)]
    shuffled = _loader(shuffle=True)
    for world in (2, 3):
        shards = [_ids(batching.shard_batches(iter(batches), r, world, max_batches=6)) for r in range(world)]
        assert sorted(sum(shards, [])) == [[float(i)] * 2 for i in range(6)]
        assert shards[0][0] == [0.0, 0.0]
    with pytest.raises(ValueError, match="shuffles with the global random generator"):
        batching.shard_batches(shuffled, 0, 2)  # every rank would draw another order
    seeded = _loader(shuffle=True, generator=torch.Generator().manual_seed(3))
    shards = [_ids(batching.shard_batches(_loader(shuffle=True, generator=torch.Generator().manual_seed(3)), r, 2))
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(_ids(seeded))  # the same order on both ranks: covered once


def test_collectives_are_no_ops_in_one_process():
    from tests.qat.models import tiny_cnn

    import quantlab as ql
    from quantlab.qat import ddp

    model = ql.quantize(tiny_cnn())
    assert distributed.world_group() is None  # the pipeline's stages then run locally
    assert ddp.broadcast_ranges(model) == 0
    assert ddp.check_ranges_agree(model) == 0
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]


def test_shards_of_sized_iterables_know_their_length():
    batches = [(torch.full((2, 1), float(i)), None) for i in range(7)]
    for world, max_batches in ((2, None), (3, None), (2, 5), (3, 2)):
        for r in range(world):
            shard = batching.shard_batches(batches, r, world, max_batches)
            assert len(shard) == len(list(shard))
    with pytest.raises(TypeError):
        len(batching.shard_batches(iter(batches), 0, 2))
