"""save_peft_lora: a trained adapter (Uni-LoRA or LoRA) written as a PEFT LoRA folder that loads onto the
transformers model, so a Uni-LoRA run can be served by any PEFT-based stack.
"""
from pathlib import Path



from .files import save_safetensors, write_json

def save_peft_lora(adapter, folder, *, base_model_name_or_path=None, prefix="base_model.model.", task_type=None,
                   rename=None, overwrite=False):
    """Write a trained adapter as a PEFT LoRA folder (adapter_model.safetensors + adapter_config.json).

    The LoRA factors come from adapter.lora_state_dict(), with lora_alpha = r, so PEFT's scale alpha/r is 1 and its
    delta is exactly B @ A. The modules trained in full (adapter.config["keep_trainable"], e.g. a classifier head)
    are exported as PEFT's modules_to_save: their state dicts under "<prefix><module>.<key>", the layout PEFT's own
    loader maps back into its ModulesToSaveWrapper. Each module name becomes prefix + name, after `rename` replaced
    a leading part of it, so that it is the module's name inside the PEFT model: e.g. prefix "base_model.model."
    and rename={"encoder.": "roberta."} when a model holding our Encoder as `encoder` and a head as `classifier` is
    exported onto RobertaForSequenceClassification."""
    existing = [n for n in ("adapter_model.safetensors", "adapter_config.json") if (Path(folder) / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}; pass overwrite=True to replace them")
    loras = adapter.lora_state_dict()
    if not loras:
        raise ValueError("the adapter has no LoRA modules to export")
    config = getattr(adapter, "config", {})
    r, tensors = config.get("r"), {}

    def target_name(name):
        for old, new in (rename or {}).items():
            if name.startswith(old):
                return prefix + new + name[len(old):]
        return prefix + name
    for name, (A, B) in loras.items():
        if (r is not None and A.shape[0] != r) or B.shape[1] != A.shape[0]:
            raise ValueError(f"{name}: A {tuple(A.shape)} and B {tuple(B.shape)} are not rank-{r} LoRA factors")
        r = A.shape[0]
        tensors[f"{target_name(name)}.lora_A.weight"] = A.detach().float().contiguous()
        tensors[f"{target_name(name)}.lora_B.weight"] = B.detach().float().contiguous()
    heads = list(config.get("keep_trainable", []))
    for head in heads:
        tensors.update(_modules_to_save_tensors(adapter.root, head, loras, target_name(head)))
    folder = Path(folder)
    save_safetensors(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
                   "target_modules": sorted({n.rsplit(".", 1)[-1] for n in loras}), "fan_in_fan_out": False,
                   "base_model_name_or_path": base_model_name_or_path, "task_type": task_type,
                   "inference_mode": True, "use_rslora": False,
                   "modules_to_save": [target_name(h).removeprefix(prefix) for h in heads] or None}
    write_json(folder / "adapter_config.json", peft_config)
    return folder


def _modules_to_save_tensors(root, head, loras, exported_name) -> dict:
    """A fully trained module's tensors, keyed as PEFT saves a modules_to_save entry: its state dict under the
    module's own name (PEFT drops the wrapper's 'modules_to_save.<adapter>' part on save and restores it on load)."""
    try:
        module = root.get_submodule(head)
    except AttributeError:
        raise ValueError(f"keep_trainable module {head!r} is not in the model; export the model it was trained "
                         "with") from None
    if any(n == head or n.startswith(head + ".") for n in loras):
        raise ValueError(f"{head!r} is trained in full and also holds LoRA layers; PEFT cannot express both")
    return {f"{exported_name}.{key}": t.detach().contiguous() for key, t in module.state_dict().items()}
