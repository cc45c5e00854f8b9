"""LoRA adapters on the LLM through peft, for fine-tuning large models under a pruning schedule.

Adapters go into the LLM's modules named in `target_modules` (e.g. ``q_proj``, ``v_proj``); every
other weight is frozen except the modules listed in `train_also` (LISA trains its projector,
``text_hidden_fcs`` and SAM's mask decoder in full). `merge_lora` folds the adapters back into the
base weights so the saved model has LISA's plain layout.
"""

from __future__ import annotations

from torch import nn

from cspexp.utils.errors import ConfigError


def apply_lora(model, *, r: int, alpha: int, dropout: float, target_modules: list[str], train_also: list[str]) -> list[str]:
    """Inject adapters into `model.llm`; freeze the rest. Returns the names of the adapted modules."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("train.lora.r > 0 needs peft: pip install 'cspexp[lora]'") from None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.llm.named_modules()}
    unknown = [t for t in target_modules if t not in names]
    if unknown:
        raise ConfigError(f"train.lora.target_modules {unknown} are not modules of the LLM "
                          "(LLaMA has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    inject_adapter_in_model(config, model.llm)
    for p in model.parameters():
        p.requires_grad = False
    adapted = []
    for name, module in model.llm.named_modules():
        if hasattr(module, "lora_A"):
            adapted.append(f"llm.{name}")
            for pn, p in module.named_parameters():
                if "lora_" in pn:
                    p.requires_grad = True
    for path in train_also:
        try:
            sub = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"train.lora.train_also: {path!r} is not a module of the model") from None
        for p in sub.parameters():
            p.requires_grad = True
    return adapted


def merge_lora(model) -> None:
    """Fold every adapter into its base Linear and put the plain Linear back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            base: nn.Module = module.get_base_layer()
            setattr(parent, name.rsplit(".", 1)[-1], base)
    for p in model.parameters():
        p.requires_grad = True
