"""mov-jax: MoV / MoLoRA parameter-efficient MoE instruction tuning of T5."""

__version__ = '0.1.0.dev0'
