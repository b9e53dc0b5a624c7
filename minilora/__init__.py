"""minilora: QLoRA + AdaLoRA built from scratch. The notebooks in notebooks/ graduate most of its modules (README)."""

__version__ = "0.1.0"
__all__ = ["AdaLoRAConfig", "add_adalora", "__version__"]


def __getattr__(name):
    # imported on first use, so that `python -m minilora graduate` and friends do not pay for importing torch
    if name in ("AdaLoRAConfig", "add_adalora"):
        from minilora import adalora

        return getattr(adalora, name)
    raise AttributeError(f"module 'minilora' has no attribute {name!r}")
