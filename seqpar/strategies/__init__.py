"""Lightning strategies of seqpar. Importing this package registers ``strategy="lightning_sp"``."""
from .checkpointing import AtomicCheckpointIO, checkpoint_is_complete, find_resume_checkpoint
from .lightning_sp import (
    STRATEGY_CLASSES,
    LightningSPStrategy,
    get_strategy_class,
    register_strategies,
    shard_batch,
)

__all__ = ["AtomicCheckpointIO", "checkpoint_is_complete", "find_resume_checkpoint", "LightningSPStrategy", "STRATEGY_CLASSES", "get_strategy_class", "register_strategies", "shard_batch"]
