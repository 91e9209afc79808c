"""CacheDataset and collate with a plain DataLoader: every sequence exactly once per epoch
under DataLoader workers and two gloo ranks, and a dataset restored from its state
continues with exactly the batches an uninterrupted one gives."""

import json
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from sparsekd import open_cache
from sparsekd.integrations.torch import CacheDataset, collate
from sparsekd.kernels import sparse_kl_loss
from sparsekd.student_train.reader import BATCH_KEYS, CacheReader
from tests.helpers import run_torchrun, synthetic_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "c"
    synthetic_cache(path, n=150, L=6, K=4, per_shard=16)
    return path


def _epoch(ds, workers, batch=4):
    out = []
    for b in DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate):
        ds.observe(b)
        out.append(b["seq_id"].tolist())
    return out


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_every_sequence_once_per_epoch_with_workers(cache, workers):
    ds = CacheDataset(cache, seed=3)
    all_ids = {s.seq_id for s in open_cache(cache)}
    for epoch in range(2):
        ds.set_epoch(epoch)
        ids = [i for b in _epoch(ds, workers) for i in b]
        assert len(ids) == len(all_ids) and set(ids) == all_ids
    first = [i for b in _epoch(CacheDataset(cache, seed=3), workers) for i in b]
    ds.set_epoch(1)
    assert first != [i for b in _epoch(ds, workers) for i in b]  # another order per epoch


def test_collate_is_ready_for_sparse_kl_loss(cache):
    b = next(iter(DataLoader(CacheDataset(cache, shuffle=False), batch_size=2, collate_fn=collate)))
    B, L = b["input_ids"].shape
    # the trainer's own reader hands on the same keys, dtypes and layout
    own = next(CacheReader(open_cache(cache), batch_size=2, prefetch=0))
    assert set(b) == set(own) | {"positions"} and set(own) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert b[k].dtype == own[k].dtype and b[k].shape[:2] == own[k].shape[:2], k
    assert b["labels"].shape == (B, L) and b["teacher_ids"].shape[:2] == (B, L)
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])  # already shifted
    V, D = 1000, 8
    h = torch.randn(B * L, D, requires_grad=True)
    w = torch.randn(V, D)
    loss = sparse_kl_loss(
        h,
        w,
        b["teacher_ids"].flatten(0, 1),
        b["teacher_probs"].flatten(0, 1),
        b["labels"].flatten(),
        divergence="fkl",
        kd_weight=0.9,
        ce_weight=0.1,
    )
    loss.backward()
    assert torch.isfinite(loss) and h.grad.abs().sum() > 0


@pytest.mark.parametrize("workers, stop", [(0, 7), (2, 7), (2, 10), (3, 20)])
def test_restored_from_its_state_it_continues_exactly(cache, workers, stop):
    full = []
    ds = CacheDataset(cache, seed=5)
    for epoch in range(2):
        ds.set_epoch(epoch)
        full += _epoch(ds, workers)
    ds = CacheDataset(cache, seed=5)
    got = []
    for b in DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate):
        ds.observe(b)
        got.append(b["seq_id"].tolist())
        if len(got) == stop:
            break
    state = json.loads(json.dumps(ds.state_dict()))  # survives a checkpoint file
    resumed = CacheDataset(cache, seed=5, state=state)
    got += _epoch(resumed, workers)
    resumed.set_epoch(1)
    got += _epoch(resumed, workers)
    assert got == full


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from sparsekd.integrations.torch import CacheDataset, collate
    dist.init_process_group("gloo")
    ds = CacheDataset(sys.argv[1], seed=1)
    epochs = []
    for e in range(2):
        ds.set_epoch(e)
        epochs.append([i for b in DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
                       for i in b["seq_id"].tolist()])
    json.dump(epochs, open(f"{sys.argv[2]}-{dist.get_rank()}.json", "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_gloo_ranks_with_two_workers_each_cover_every_sequence_once(tmp_path, cache):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    proc = run_torchrun(script, cache, tmp_path / "seen", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen-{r}.json").read_text()) for r in (0, 1)]
    all_ids = {s.seq_id for s in open_cache(cache)}
    for e in range(2):
        a, b = ranks[0][e], ranks[1][e]
        assert not set(a) & set(b) and sorted(a + b) == sorted(all_ids)
