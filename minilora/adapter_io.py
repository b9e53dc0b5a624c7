"""Saving, loading and exporting finished adapters: AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512) and LoRA
(Hu et al. 2021, arXiv 2106.09685).

A finished AdaLoRA adapter only needs the triplets its rank pattern kept: the kept columns of P, entries of λ and
rows of Q; a layer may keep none. Three formats:

- minilora's: ``minilora_adapter.safetensors`` (tensors ``<module>.P``, ``<module>.lam``, ``<module>.Q`` in pruned
  shapes) and ``minilora_adapter.json`` (the AdaLoRAConfig, the rank pattern, each layer's scaling, the base model).
  ``load_adapter`` puts it back on a fresh base model; each loaded layer keeps only the saved triplets and records
  which of its initial ones they are in ``.rank_mask`` (one flag per initial triplet), so it can be saved or
  exported again.
- peft's AdaLoRA format: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
  ``base_model.model.<module>.lora_A / lora_E / lora_B``), loadable with ``PeftModel.from_pretrained(base, dir)``.
- peft's LoRA format, for plain LoRA runs (``save_lora``): keys ``base_model.model.<module>.lora_A.weight`` and
  ``.lora_B.weight``.

peft finds the base model by ``base_model_name_or_path`` (``AutoPeftModelForCausalLM.from_pretrained(dir)``), so
every writer records one: the ``base_model`` argument, else the model's own ``name_or_path`` (transformers sets it
when it loads a model from a directory or the Hub); a local directory is written as its absolute path.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minilora.adalora import AdaLoRAConfig, attach_svd_adapters
from minilora.lora import LoRALinear, is_linear, matches_target, replace_module
from minilora.svd_adapter import SVDLinear

FORMAT = "minilora-adalora/1"
WEIGHTS_FILE = "minilora_adapter.safetensors"
META_FILE = "minilora_adapter.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_RANK_EPSILON = 1e-5  # peft scales by lora_alpha / (init_r + 1e-5)


def stored_triplets(name, module):
    """One flag per initial triplet of an SVDLinear (module.r of them): True where it still stores that triplet.

    A layer that load_adapter shrank says which in .rank_mask; any other layer stores all of them."""
    flags = list(getattr(module, "rank_mask", None) or [True] * module.r)
    if len(flags) != module.r or sum(map(bool, flags)) != module.lam.numel():
        raise ValueError(
            f"{name} stores {module.lam.numel()} of its {module.r} initial triplets but does not record which (was "
            "keep_triplets called by hand?): save the adapter before calling keep_triplets, passing the rank pattern"
        )
    return torch.as_tensor([bool(flag) for flag in flags], dtype=torch.bool)


def kept_triplets(model, rank_pattern=None):
    """{module name: (SVDLinear, keep, flags)} for every adapter. keep selects the stored triplets to write; flags
    (one per initial triplet, module.r of them) says which initial triplets those are, as the rank pattern peft and
    load_adapter read. rank_pattern None keeps every stored triplet.

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
                f"rank_pattern[{name!r}] has {keep.numel()} flags but the adapter stores {module.lam.numel()} "
                "triplets: give one flag per stored triplet, or rank_pattern=None to keep them all"
            )
        stored = stored_triplets(name, module)
        flags = stored.clone()
        flags[stored] = keep  # the initial triplets still kept: stored ones that keep keeps
        kept[name] = (module, keep, flags)
    return kept


def base_model_reference(model, base_model):
    """What to record as the base model: base_model, else the model's name_or_path, else None; a local directory
    becomes its absolute path, so the record still holds when read from another working directory."""
    reference = base_model if base_model is not None else getattr(model, "name_or_path", None) or None
    if reference is None:
        return None
    directory = Path(reference).expanduser()
    return str(directory.resolve()) if directory.is_dir() else str(reference)


def save_adapter(model, directory, config, rank_pattern=None, base_model=None):
    """Write the kept triplets of every adapter and the config to directory (created if needed); return its Path.

    base_model (a Hub name or a local directory) is recorded as "base_model" for a later export_peft."""
    directory = Path(directory)
    kept = kept_triplets(model, rank_pattern)
    tensors, scaling = {}, {}
    for name, (module, keep, _) in kept.items():
        keep = keep.to(module.lam.device)
        with torch.no_grad():
            tensors[f"{name}.P"] = module.P[:, keep].float().cpu().contiguous()
            tensors[f"{name}.lam"] = module.lam[keep].float().cpu().contiguous()
            tensors[f"{name}.Q"] = module.Q[keep].float().cpu().contiguous()
        scaling[name] = float(module.scaling)
    meta = {
        "format": FORMAT,
        "config": asdict(config),
        "rank_pattern": {name: flags.tolist() for name, (_, _, flags) in kept.items()},
        "scaling": scaling,
        "base_model": base_model_reference(model, base_model),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def read_adapter_meta(directory):
    """The JSON saved next to the tensors: {"format", "config", "rank_pattern", "scaling", "base_model"}
    ("base_model" is None for adapters saved before it was recorded)."""
    path = Path(directory) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a directory written by save_adapter?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this version of minilora reads {FORMAT!r}")
    meta.setdefault("base_model", None)
    return meta


def load_adapter(model, directory):
    """Put a saved adapter onto a base model (in place) and return the model; all or nothing.

    The base model must be the one the adapter was trained on. Adapters are attached exactly as add_adalora did
    (for init="svd" this recomputes the same residual base weights), then shrunk to the saved triplets and filled
    with the saved values, so the outputs equal those of the saved model; each layer records its saved flags in
    .rank_mask, so save_adapter and export_peft work on it again. Every file and shape is checked before any value
    is filled in; when one does not fit, the adapters are taken off again and the error says why, so the model is
    as it was (for init="svd", up to float rounding of its restored weights) and a retry can follow.
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
        module.rank_mask = [bool(flag) for flag in flags]
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


def export_peft(model, directory, config, rank_pattern=None, task_type="CAUSAL_LM", base_model=None):
    """Write the adapter in peft 0.21's AdaLoRA format, so that PeftModel.from_pretrained(base, directory) gives
    the same outputs; return the directory's Path.

    Works on a model just trained (pass the allocator's rank_pattern) and on one that load_adapter filled (the
    pattern is the one it loaded; pass read_adapter_meta(dir)["base_model"] as base_model if the base has no
    name_or_path of its own). peft scales by lora_alpha / (init_r + 1e-5) for every layer; λ is rescaled so that
    each layer's λ·scaling is unchanged. task_type chooses peft's model class when loading ("CAUSAL_LM" for the
    causal language models minilora tunes; None for a model without generate). When loading, peft 0.21 warns that
    the rank_pattern keys "did not match any targeted module"; it says the same for adapters it saved itself, and
    still shrinks the layers by that pattern.
    """
    if config.init == "svd":
        raise ValueError(
            "init='svd' changed the base weights (they keep W minus the top singular triplets), which peft's "
            "AdaLoRA format cannot express: merge the adapter and save the whole model instead"
        )
    kept = kept_triplets(model, rank_pattern)
    tensors = {}
    for name, (module, keep, _) in kept.items():
        keep = keep.to(module.lam.device)
        # peft multiplies by lora_alpha / (ranknum + 1e-5), with ranknum = the initial rank of the layer
        to_peft = module.scaling * (module.r + PEFT_RANK_EPSILON) / config.lora_alpha
        prefix = f"base_model.model.{name}"
        with torch.no_grad():
            tensors[f"{prefix}.lora_A"] = module.Q[keep].float().cpu().contiguous()
            tensors[f"{prefix}.lora_E"] = (module.lam[keep] * to_peft)[:, None].float().cpu().contiguous()
            tensors[f"{prefix}.lora_B"] = module.P[:, keep].float().cpu().contiguous()
    return write_peft(directory, tensors, {
        "peft_type": "ADALORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_reference(model, base_model),
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
        "rank_pattern": {f"{name}.lora_E": flags.tolist() for name, (_, _, flags) in kept.items()},
    })


def save_lora(model, directory, target_modules, r, lora_alpha, base_model=None, task_type="CAUSAL_LM"):
    """Write the LoRALinear adapters of a plain LoRA run (add_lora) in peft's LoRA format, so that
    PeftModel.from_pretrained(base, directory) gives the same outputs; return the directory's Path.

    target_modules, r and lora_alpha are those given to add_lora; they are checked against the adapters, since
    peft rebuilds the layers from them (scaling lora_alpha / r, as LoRALinear's).
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    adapters = {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no LoRALinear adapters to save: call add_lora first")
    for name, module in adapters.items():
        if not matches_target(name, targets):
            raise ValueError(f"{name} has an adapter but target_modules={targets} does not name it: pass the "
                             "target_modules given to add_lora")
        if module.r != r or module.scaling != lora_alpha / r:
            raise ValueError(f"{name} has r={module.r} and scaling {module.scaling:.6g}, but r={r}, "
                             f"lora_alpha={lora_alpha} give scaling {lora_alpha / r:.6g}: pass the r and lora_alpha "
                             "given to add_lora")
    bare = [name for name, module in model.named_modules() if is_linear(module) and matches_target(name, targets)]
    if bare:
        raise ValueError(f"target_modules={targets} also names {bare[:3]}, which have no adapter (peft would add "
                         "untrained ones): pass the target_modules given to add_lora")
    tensors = {}
    with torch.no_grad():
        for name, module in adapters.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.A.float().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.B.float().cpu().contiguous()
    dropout = next(iter(adapters.values())).dropout
    return write_peft(directory, tensors, {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_reference(model, base_model),
        "target_modules": targets,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": getattr(dropout, "p", 0.0),
        "use_rslora": False,
        "use_dora": False,
    })


def write_peft(directory, tensors, peft_config):
    """Write peft's two adapter files into directory (created if needed), with the settings every minilora export
    shares (inference mode, no bias, weights stored as [out, in], no extra trained modules); return its Path."""
    directory = Path(directory)
    peft_config = peft_config | {"inference_mode": True, "bias": "none", "fan_in_fan_out": False,
                                 "init_lora_weights": True, "modules_to_save": None}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / PEFT_WEIGHTS_FILE)
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return directory
