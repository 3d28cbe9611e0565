"""data.balance_ranks: global batches split across DDP ranks by size (haskd/data/sampler.py)."""
import torch

from haskd.data.sampler import BalancedRankSampler, split_by_size


def test_split_by_size_balances_by_hand():
    sizes = {0: 48, 1: 51, 2: 60, 3: 21}  # the four rooms of docs/performance.md 00 (thousands of voxels)
    # longest first: 2 -> rank 0 (60), 1 -> rank 1 (51), 0 -> rank 1 (99), 3 -> rank 0 (81)
    assert split_by_size([0, 1, 2, 3], sizes, 2, 2) == [[2, 3], [1, 0]]
    # the round-robin split (0, 2 | 1, 3) has a slowest rank of 108; this one 99
    assert split_by_size([5, 6, 7], {5: 1, 6: 1, 7: 1}, 2, 2) == [[5, 7], [6]]  # ties: the lower rank first
    assert split_by_size([0, 1, 2, 3], sizes, 1, 4) == [[2, 1, 0, 3]]


def test_every_step_has_the_distributed_samplers_global_batch():
    sizes = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    world, bs = 2, 2
    ranks = [list(BalancedRankSampler(sizes, world, r, bs, seed=3)) for r in range(world)]
    assert all(len(x) == len(BalancedRankSampler(sizes, world, 0, bs)) == 6 for x in ranks)  # ceil(11 / 4) steps
    ref = [list(torch.utils.data.DistributedSampler(range(11), world, r, shuffle=True, seed=3)) for r in range(world)]
    for s in range(3):
        got = sorted(i for x in ranks for i in x[s * bs:(s + 1) * bs])
        want = sorted(i for x in ref for i in x[s * bs:(s + 1) * bs])
        assert got == want  # the last step padded by wrapping around, as DistributedSampler pads
        loads = [sum(sizes[i] for i in x[s * bs:(s + 1) * bs]) for x in ranks]
        assert max(loads) - min(loads) <= max(sizes)
    assert set(i for x in ranks for i in x) == set(range(11))  # every sample in the epoch


def test_epochs_differ_and_ranks_agree_on_the_permutation():
    sizes = list(range(1, 17))
    a0, a1 = BalancedRankSampler(sizes, 2, 0, 2), BalancedRankSampler(sizes, 2, 1, 2)
    e0 = list(a0)
    assert not set(e0) & set(a1)  # the two ranks never take the same sample in one epoch
    a0.set_epoch(1)
    assert list(a0) != e0


def test_training_uses_it_under_ddp_only_when_asked(tiny_rooms, monkeypatch):
    from haskd.config import load_config
    from haskd.engine import distributed as du
    from haskd.workflow.build import build_datasets, train_sampler

    cfg = load_config(None, ["model.preset=tiny", f"data.root={tiny_rooms}", "data.balance_ranks=true"])
    train = build_datasets(cfg, ("train",))["train"]
    assert isinstance(train_sampler(cfg, train), torch.utils.data.DistributedSampler)  # one process: as before
    monkeypatch.setattr(du, "world_size", lambda: 2)
    monkeypatch.setattr(du, "rank", lambda: 1)
    s = train_sampler(cfg, train)
    assert isinstance(s, BalancedRankSampler) and (s.world, s.rank) == (2, 1)
    assert s.sizes == [train.scenes[i % len(train.scenes)].num_points for i in range(len(train))]
    cfg.data.balance_ranks = False
    assert isinstance(train_sampler(cfg, train), torch.utils.data.DistributedSampler)
