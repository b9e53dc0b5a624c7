"""Saving, loading and exporting finished AdaLoRA adapters (Zhang et al., ICLR 2023, arXiv 2303.10512).

A finished AdaLoRA adapter only needs the triplets its rank pattern kept: the kept columns of P, entries of λ and
rows of Q; a layer may keep none. Two formats:

- minilora's: ``minilora_adapter.safetensors`` (tensors ``<module>.P``, ``<module>.lam``, ``<module>.Q`` in pruned
  shapes) and ``minilora_adapter.json`` (the AdaLoRAConfig, the rank pattern, each layer's scaling).
  ``load_adapter`` puts it back on a fresh base model.
- peft's AdaLoRA format: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
  ``base_model.model.<module>.lora_A / lora_E / lora_B``), loadable with ``PeftModel.from_pretrained(base, dir)``.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minilora.adalora import AdaLoRAConfig, attach_svd_adapters
from minilora.lora import replace_module
from minilora.svd_adapter import SVDLinear

FORMAT = "minilora-adalora/1"
WEIGHTS_FILE = "minilora_adapter.safetensors"
META_FILE = "minilora_adapter.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_RANK_EPSILON = 1e-5  # peft scales by lora_alpha / (init_r + 1e-5)


def kept_triplets(model, rank_pattern=None):
    """{module name: (SVDLinear, bool mask of kept triplets)} for every adapter; rank_pattern None keeps them all.

    rank_pattern is {module name: list[bool]} as produced by RankAllocator.rank_pattern; it must name exactly the
    model's adapters, one flag per stored triplet.
    """
    adapters = {name: module for name, module in model.named_modules() if isinstance(module, SVDLinear)}
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no SVDLinear adapters to save: call add_adalora first")
    merged = [name for name, module in adapters.items() if module.merged]
    if merged:
        raise ValueError(f"adapters {merged[:3]} are merged into their base weights: call unmerge() before saving")
    if rank_pattern is None:
        rank_pattern = {name: [True] * module.lam.numel() for name, module in adapters.items()}
    missing, unknown = sorted(set(adapters) - set(rank_pattern)), sorted(set(rank_pattern) - set(adapters))
    if missing or unknown:
        raise ValueError(
            f"rank_pattern does not match the model's adapters: missing {missing[:3]}, unknown {unknown[:3]}; "
            "pass allocator.rank_pattern from the RankAllocator that trained this model"
        )
    kept = {}
    for name, module in adapters.items():
        keep = torch.as_tensor([bool(flag) for flag in rank_pattern[name]], dtype=torch.bool)
        if keep.numel() != module.lam.numel():
            raise ValueError(
                f"rank_pattern[{name!r}] has {keep.numel()} flags but the adapter stores {module.lam.numel()} triplets"
            )
        kept[name] = (module, keep)
    return kept


def save_adapter(model, directory, config, rank_pattern=None):
    """Write the kept triplets of every adapter and the config to directory (created if needed); return its Path."""
    directory = Path(directory)
    kept = kept_triplets(model, rank_pattern)
    tensors, scaling = {}, {}
    for name, (module, keep) in kept.items():
        keep = keep.to(module.lam.device)
        with torch.no_grad():
            tensors[f"{name}.P"] = module.P[:, keep].float().cpu().contiguous()
            tensors[f"{name}.lam"] = module.lam[keep].float().cpu().contiguous()
            tensors[f"{name}.Q"] = module.Q[keep].float().cpu().contiguous()
        scaling[name] = float(module.scaling)
    meta = {
        "format": FORMAT,
        "config": asdict(config),
        "rank_pattern": {name: keep.tolist() for name, (_, keep) in kept.items()},
        "scaling": scaling,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def read_adapter_meta(directory):
    """The JSON saved next to the tensors: {"format", "config", "rank_pattern", "scaling"}."""
    path = Path(directory) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a directory written by save_adapter?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this version of minilora reads {FORMAT!r}")
    return meta


def load_adapter(model, directory):
    """Put a saved adapter onto a base model (in place) and return the model; all or nothing.

    The base model must be the one the adapter was trained on. Adapters are attached exactly as add_adalora did
    (for init="svd" this recomputes the same residual base weights), then shrunk to the saved triplets and filled
    with the saved values, so the outputs equal those of the saved model. Every file and shape is checked before
    any value is filled in; when one does not fit, the adapters are taken off again and the error says why, so the
    model is as it was (for init="svd", up to float rounding of its restored weights) and a retry can follow.
    """
    meta = read_adapter_meta(directory)
    config = AdaLoRAConfig(**meta["config"])
    path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(path)
    except Exception as error:  # missing, truncated or not safetensors: nothing has been touched yet
        raise ValueError(f"{path} cannot be read ({error}): save the adapter again") from None
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    names = attach_svd_adapters(model, config)
    try:
        check_saved_shapes(model, names, meta["rank_pattern"], tensors)
    except ValueError:
        for name in names:
            adapter = model.get_submodule(name)
            if config.init == "svd":
                adapter.merge()  # gives the base back the top singular triplets the initialization took out
            replace_module(model, name, adapter.base)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        raise
    for name, flags in meta["rank_pattern"].items():
        module = model.get_submodule(name)
        module.keep_triplets(flags)
        with torch.no_grad():
            for key in ("P", "lam", "Q"):
                getattr(module, key).copy_(tensors[f"{name}.{key}"])
        module.scaling = meta["scaling"][name]
    return model


def check_saved_shapes(model, names, rank_pattern, tensors):
    """Raise ValueError unless the saved adapter fits these freshly attached adapters, triplet for triplet."""
    if sorted(names) != sorted(rank_pattern):
        unknown = sorted(set(rank_pattern) - set(names)) or sorted(set(names) - set(rank_pattern))
        raise ValueError(f"the adapter was saved for other modules than this model targets (e.g. {unknown[:3]}): "
                         "load it onto the same kind of base model it was trained on")
    for name, flags in rank_pattern.items():
        module, kept = model.get_submodule(name), sum(flags)
        if len(flags) != module.r:
            raise ValueError(f"{name} was saved with {len(flags)} triplets but this model's adapter has {module.r}")
        needed = {"P": (module.out_features, kept), "lam": (kept,), "Q": (kept, module.in_features)}
        for key, shape in needed.items():
            saved = tensors.get(f"{name}.{key}")
            if saved is None or tuple(saved.shape) != shape:
                found = "nothing" if saved is None else f"shape {tuple(saved.shape)}"
                raise ValueError(f"{name}.{key} was saved with {found} but this model needs {shape}: load the adapter "
                                 "onto the base model it was trained on")


def export_peft(model, directory, config, rank_pattern=None, task_type=None):
    """Write the adapter in peft 0.21's AdaLoRA format, so that PeftModel.from_pretrained(base, directory) gives
    the same outputs; return the directory's Path.

    peft scales by lora_alpha / (init_r + 1e-5) for every layer; λ is rescaled so that each layer's
    λ·scaling is unchanged. task_type (e.g. "CAUSAL_LM") chooses peft's model class when loading. When loading,
    peft 0.21 warns that the rank_pattern keys "did not match any targeted module"; it says the same for adapters
    it saved itself, and still shrinks the layers by that pattern.
    """
    if config.init == "svd":
        raise ValueError(
            "init='svd' changed the base weights (they keep W minus the top singular triplets), which peft's "
            "AdaLoRA format cannot express: merge the adapter and save the whole model instead"
        )
    directory = Path(directory)
    kept = kept_triplets(model, rank_pattern)
    tensors = {}
    for name, (module, keep) in kept.items():
        keep = keep.to(module.lam.device)
        # peft multiplies by lora_alpha / (ranknum + 1e-5), with ranknum = the initial rank of the layer
        to_peft = module.scaling * (module.r + PEFT_RANK_EPSILON) / config.lora_alpha
        prefix = f"base_model.model.{name}"
        with torch.no_grad():
            tensors[f"{prefix}.lora_A"] = module.Q[keep].float().cpu().contiguous()
            tensors[f"{prefix}.lora_E"] = (module.lam[keep] * to_peft)[:, None].float().cpu().contiguous()
            tensors[f"{prefix}.lora_B"] = module.P[:, keep].float().cpu().contiguous()
    peft_config = {
        "peft_type": "ADALORA",
        "task_type": task_type,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "target_modules": list(config.target_modules),
        "init_r": config.init_r,
        "target_r": config.target_r,
        "tinit": config.t_init,
        "tfinal": config.t_final,
        "deltaT": config.delta_t,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "total_step": config.total_steps,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "rank_pattern": {f"{name}.lora_E": keep.tolist() for name, (_, keep) in kept.items()},
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / PEFT_WEIGHTS_FILE)
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return directory
