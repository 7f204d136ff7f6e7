"""LoRA adapter metadata: the `tailmon_lora.json` that `tailmon.proposals.lora` writes next to a
peft adapter, reading it, and checking an adapter against the model it is applied to.

Kept out of the transformers engine's module, which imports torch (to compute a model's facts,
`base_model_facts`), so that a proposal checks an adapter's metadata when it is parsed without
importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from tailmon.errors import InputError

# The metadata file LoRA training writes next to a peft adapter (see tailmon.proposals.lora);
# adapters without it (trained elsewhere) load unchecked, as peft allows.
ADAPTER_METADATA = "tailmon_lora.json"
ADAPTER_FORMAT = "tailmon-lora/1"


def read_adapter_metadata(path: str) -> dict | None:
    """The tailmon metadata of an adapter folder; None when it has none (trained elsewhere)."""
    file = Path(path) / ADAPTER_METADATA
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"LoRA adapter '{path}': cannot read {ADAPTER_METADATA}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT or not isinstance(meta.get("base_model"), dict):
        raise InputError(f"LoRA adapter '{path}': {ADAPTER_METADATA} is not '{ADAPTER_FORMAT}' metadata")
    return meta


def adapter_compatibility(meta: dict, facts: dict, path: str, model_id: str) -> str | None:
    """Refuse an adapter trained on another architecture or tokenizer (InputError); return the
    warning for one trained on another checkpoint or chat template of the same, else None.

    Weights stay exact either way: p is always scored under the current target and q under the
    current target plus the adapter, sampling and scoring alike. A mismatch of architecture or
    tokenizer is refused because the adapter would then be meaningless (or not load at all).
    """
    base = meta["base_model"]
    trained_on = base.get("ref", "?")
    if base.get("architecture_sha256") != facts["architecture_sha256"]:
        raise InputError(
            f"LoRA adapter '{path}' was trained on {trained_on} ({base.get('model_type')}, hidden "
            f"{base.get('hidden_size')}, {base.get('num_hidden_layers')} layers), whose architecture differs from "
            f"model {model_id} ({facts['model_type']}, hidden {facts['hidden_size']}, "
            f"{facts['num_hidden_layers']} layers): retrain it on this model")
    if base.get("tokenizer_sha256") != facts["tokenizer_sha256"]:
        raise InputError(
            f"LoRA adapter '{path}' was trained on {trained_on}, whose tokenizer differs from model {model_id}'s "
            f"(vocabulary {base.get('vocab_size')} vs {facts['vocab_size']} tokens, or other special tokens): "
            "retrain it on this model")
    changed = []
    if base.get("weights_fingerprint") != facts["weights_fingerprint"]:
        changed.append("another checkpoint")
    if base.get("chat_template_sha256") != facts["chat_template_sha256"]:
        changed.append("another chat template")
    if not changed:
        return None
    return (f"LoRA adapter '{path}' was trained on {' and '.join(changed)} ({trained_on}) than model {model_id}: "
            "the weights stay exact, but the proposal may be less efficient (retrain it on this checkpoint)")
