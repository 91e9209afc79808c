"""sparsekd: knowledge distillation from an offline sparse teacher-logit cache."""

__version__ = "0.1.0"
from sparsekd.schemas.cache import open_cache

__all__ = ["open_cache", "__version__"]
