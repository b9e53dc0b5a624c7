"""minilora: QLoRA + AdaLoRA built from scratch. Each notebook in notebooks/ graduates one module here."""

__version__ = "0.1.0"
