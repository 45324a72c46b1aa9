"""Lightning strategies of seqpar. Importing this package registers ``strategy="lightning_sp"``."""
from .lightning_sp import (
    STRATEGY_CLASSES,
    LightningSPStrategy,
    get_strategy_class,
    register_strategies,
    shard_batch,
)

__all__ = ["LightningSPStrategy", "STRATEGY_CLASSES", "get_strategy_class", "register_strategies", "shard_batch"]
