"""The settings of a tune, checked before anything heavy runs.

DESIGN.md's rule for the command line and `run`: every setting is checked before the model or the data load, and
a mistake ends in one line naming the setting, its value and the fix. Notebook 09 defines `TrainSettings` and
`RunConfig` (minilora.tune); their `check()` methods call the functions here. This is plumbing that no notebook
teaches, kept apart so that the notebook reads as the algorithm.
"""

import math

import torch

from minilora.architectures import check_model_spec
from minilora.checkpoints import check_checkpoints
from minilora.outputs import check_output_dir


def refuse_bad_settings(settings, rules):
    """rules: (field name, whether its value is acceptable, what to do instead). Raise on the first bad one."""
    for name, ok, fix in rules:
        if not ok:
            raise ValueError(f"{name}={getattr(settings, name)!r}: {fix}")


def check_train_settings(settings):
    """Refuse a TrainSettings that cannot train, naming the field, its value and the fix."""
    s = settings
    refuse_bad_settings(s, [
        ("steps", s.steps >= 1, "train for at least 1 optimizer step"),
        ("batch_size", s.batch_size >= 1, "use at least 1 example per micro-batch"),
        ("grad_accum", s.grad_accum >= 1, "use at least 1 micro-batch per optimizer step"),
        ("lr", math.isfinite(s.lr) and s.lr > 0, "use a positive learning rate (5e-3 here, 2e-4 for 7B)"),
        ("weight_decay", s.weight_decay >= 0, "use 0 or a positive weight decay"),
        ("max_grad_norm", s.max_grad_norm > 0, "use a positive clipping norm (1.0 here; QLoRA used 0.3)"),
        ("eval_every", s.eval_every >= 0, "use 0 (never) or a positive number of optimizer steps"),
        ("resident_bytes", s.resident_bytes is None or s.resident_bytes > 0,
         "leave it unset (every page resident) or give a positive number of bytes"),
        ("page_bytes", s.page_bytes is None or s.page_bytes > 0,
         "leave it unset (a fitting size is chosen) or give a positive number of bytes"),
        ("warmup_ratio", 0 <= s.warmup_ratio < 1, "use a fraction of the steps from 0 to below 1 (QLoRA: 0.03)"),
        ("loss_scale", s.loss_scale is None or s.loss_scale >= 1,
         "leave it unset (float16 runs start at 65536) or use 1 or more"),
        ("seed", s.seed >= 0, "use 0 or a positive integer"),
        ("checkpoint_every", s.checkpoint_every >= 0, "use 0 (only on Ctrl-C) or a number of steps"),
    ])


def check_run_config(config, here=True):
    """Refuse a RunConfig that cannot work, naming the field, its value and the fix, before the model or data load.
    here=False skips what only matters to a run on this machine (the device, the output directory), for plans."""
    c = config
    check_train_settings(c.train)
    check_model_spec(c.model)
    refuse_bad_settings(c, [
        ("method", c.method in ("adalora", "lora"), "use 'adalora' or 'lora'"),
        ("target_modules", len(c.target_modules) > 0, "name at least one layer type, e.g. q_proj v_proj"),
        ("target_r", c.target_r >= 1, "use a rank of at least 1"),
        ("init_r", c.method == "lora" or c.init_r >= c.target_r,
         f"AdaLoRA starts at init_r and prunes to target_r={c.target_r}: use init_r >= target_r"),
        ("lora_alpha", c.lora_alpha > 0, "use a positive scaling numerator (12 here)"),
        ("orth_reg_weight", c.orth_reg_weight >= 0, "use 0 (no penalty) or a positive weight (0.1 here)"),
        ("max_length", c.max_length >= 8, "records need room for a prompt and an answer: use 8 tokens or more"),
        ("eval_examples", c.eval_examples >= 1, "evaluate on at least 1 held-out example"),
        ("device", c.device == "cpu" or c.device.startswith("cuda"), "use cpu or cuda"),
        ("device", not here or c.device == "cpu" or torch.cuda.is_available(),
         "use cpu: torch sees no CUDA GPU here (python -m minilora env says why)"),
        ("data", c.data is None or str(c.data).strip() != "",
         "leave it unset for the bundled set, or name a file, a directory or a hub data set"),
        ("compute_dtype", c.compute_dtype in (None, "float32", "bfloat16", "float16"),
         "use float32, bfloat16 or float16, or leave it unset for the device's best"),
        ("compute_dtype", not here or c.compute_dtype != "bfloat16" or c.device == "cpu"
         or torch.cuda.is_bf16_supported(), "this GPU has no bfloat16 (a T4, a V100): use float16"),
        ("compile_dequantize", c.quantize or not c.compile_dequantize,
         "only an NF4 base is dequantized: quantize it, or leave compile_dequantize off"),
    ])
    if c.method == "adalora" and c.train.steps < 2:
        raise ValueError(f"steps={c.train.steps}: AdaLoRA scores the adapters for at least one step before its "
                         "final mask, so it needs 2 optimizer steps or more (or use --method lora)")
    if here:
        check_checkpoints(c.output_dir, c.resume, c.overwrite)
        check_output_dir(c.output_dir, c.overwrite)
