"""grpo-ext: GRPO (DeepSeekMath) fine-tuning with 4-bit QLoRA on one GPU, built on TRL."""

from .config import GRPOExtConfig
from .trainer import GRPOExtTrainer

__version__ = "0.1.0"
__all__ = ["GRPOExtConfig", "GRPOExtTrainer", "__version__"]
