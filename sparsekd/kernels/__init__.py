"""Loss kernels: the fused sparse-KL loss and its plain-torch reference."""

from sparsekd.kernels.sparse_kl import sparse_kl_loss, sparse_kl_loss_parts

__all__ = ["sparse_kl_loss", "sparse_kl_loss_parts"]
