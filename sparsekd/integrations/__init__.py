"""Use a sparsekd cache and loss from the trainers people already run.

- `sparsekd.integrations.torch`: `CacheDataset` (a `torch.utils.data.IterableDataset`
  striding by distributed rank and DataLoader worker, seeded, resumable) and `collate`.
- `sparsekd.integrations.transformers`: `SparseKDTrainer` (a `transformers.Trainer`) and
  `SparseKDMixin` (the same for TRL's trainers, which derive from it).

docs/integrations.md has complete examples.
"""
