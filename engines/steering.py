"""Activation steering: direction files, the hooks that apply them, and computing directions.

A direction is a difference of means of the residual stream (the output of a decoder layer) at
the last prompt token, between two contrastive prompt sets: harmful minus harmless instructions
gives a refusal direction (Arditi et al. 2024). A steered variant edits the residual stream
during every forward pass, at every position of every sequence in the batch, by addition
(x + coef * v) or directional ablation (x - alpha (x . r) r, r = v / |v|).

Earlier research code applied its hook through a batch-index slice that never matched, so the
"steered" proposal was the target itself (q == p, every weight 1) and nothing said so. Here the
hook touches no batch index at all, and every pass checks that each hook actually ran.

File format (one safetensors file): tensor `directions`, float32 (num_layers, hidden_size), the
difference of means at the output of each decoder layer; metadata key `tailmon` holding JSON with
`format` ("tailmon-steering/1"), `layer` (the layer whose difference is *the* direction), `model`,
`model_sha256` (config and tokenizer), `hidden_size`, `num_layers`, `layer_rule`, per-layer
`diff_norms`, `activation_norms` and `relative_norms`, `positive`/`negative` (file and count),
`system_prompt`, `created` and `tailmon_version`. Every layer is kept so that the choice can be
inspected.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from tailmon import __version__
from tailmon.errors import InputError, RuntimeFailure

if TYPE_CHECKING:
    # torch is imported where a function needs it: proposals import this module to read direction
    # files when a spec is parsed, and `import tailmon.proposals` must not import torch.
    import torch

FORMAT = "tailmon-steering/1"
METADATA_KEY = "tailmon"
TENSOR = "directions"


@dataclass
class DirectionFile:
    path: str
    directions: torch.Tensor
    """float32 (num_layers, hidden_size) on the CPU."""
    metadata: dict

    @property
    def layer(self) -> int:
        return int(self.metadata["layer"])

    @property
    def num_layers(self) -> int:
        return int(self.directions.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.directions.shape[1])

    @property
    def direction(self) -> torch.Tensor:
        """The saved layer's difference of means: the vector every hooked layer uses."""
        return self.directions[self.layer]


def load_direction(path: str | os.PathLike) -> DirectionFile:
    """Read a direction file written by `save_direction`; InputError (one line) when it is not one."""
    import torch
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not Path(path).is_file():
        raise InputError(f"steering direction file '{path}' does not exist (make one with `tailmon proposals steer`)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "null"))
            if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
                raise InputError(f"'{path}' is not a tailmon steering direction file (no '{FORMAT}' metadata)")
            if TENSOR not in f.keys():
                raise InputError(f"steering direction file '{path}' has no '{TENSOR}' tensor")
            directions = f.get_tensor(TENSOR).float()
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot read steering direction file '{path}': {exc}") from None
    if directions.ndim != 2 or directions.shape[0] < 1:
        raise InputError(f"steering direction file '{path}': '{TENSOR}' must be (layers, hidden), got {tuple(directions.shape)}")
    layer = metadata.get("layer")
    if not (isinstance(layer, int) and 0 <= layer < directions.shape[0]):
        raise InputError(f"steering direction file '{path}': its layer {layer!r} is not one of its {directions.shape[0]} layers")
    if not torch.isfinite(directions[layer]).all():
        raise InputError(f"steering direction file '{path}': the direction at layer {layer} is not finite")
    return DirectionFile(path, directions, metadata)


def save_direction(path: str | os.PathLike, directions: torch.Tensor, metadata: dict) -> None:
    """Write a direction file atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a directory; give a file name", setting="output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({TENSOR: directions.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={METADATA_KEY: json.dumps({"format": FORMAT, **metadata})})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers, whose outputs are the residual stream (peft wrappers seen through)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == n:
        return layers
    found = [m for name, m in base.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")]
    if len(found) != 1:
        raise InputError(f"cannot find the decoder layers of {type(base).__name__} to steer")
    return found[0]


def _edit(kind: str, coef: float, vector: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The residual edit on a (batch, positions, hidden) tensor: no index into either of the first two."""
    if kind == "add":
        delta = coef * vector
        return lambda x: x + delta
    unit = vector  # the engine passes r already normalised (in float32, before any cast)

    def ablate(x: torch.Tensor) -> torch.Tensor:
        return x - coef * (x @ unit).unsqueeze(-1) * unit

    return ablate


@contextlib.contextmanager
def steering_hooks(layers: torch.nn.ModuleList, indices: Sequence[int], kind: str, coef: float, vector: torch.Tensor,
                   rows: torch.Tensor | None = None):
    """Forward hooks editing the outputs of `layers[indices]` for the duration of the block.

    `rows`: a bool mask over the batch's rows (a batch that mixes steered and unsteered rows,
    `TransformersEngine.sample_mixture`): only those rows are edited, each as it is edited alone
    (the edit is row by row). None: every row. The hooks are removed on every exit, an exception
    included; a block that ends normally must have run every hooked layer at least once, else the
    steering was a silent no-op.
    """
    edit = _edit(kind, coef, vector)
    if rows is not None:
        import torch

        whole, keep = edit, rows.view(-1, 1, 1)

        def edit(x: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.to(x.device), whole(x), x)

    calls = [0] * len(indices)

    def make(slot: int):
        def hook(module, args, output):
            calls[slot] += 1
            # Decoder layers return the hidden states alone (transformers 5) or first in a tuple.
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)
        return hook

    handles = []
    try:
        for slot, i in enumerate(indices):
            handles.append(layers[i].register_forward_hook(make(slot)))
        yield
    finally:
        for h in handles:
            h.remove()
    if not all(calls):
        missed = [i for i, c in zip(indices, calls) if not c]
        raise RuntimeFailure(f"steering hooks on layers {missed} never ran: the model does not run the layers they were put on")


# -- computing a direction ----------------------------------------------------------------------


def middle_third(num_layers: int) -> range:
    """Layers floor(L/3) .. ceil(2L/3) - 1, never empty."""
    lo = num_layers // 3
    return range(lo, max(lo + 1, math.ceil(2 * num_layers / 3)))


def choose_layer(relative_norms: Sequence[float]) -> int:
    """The `--layer auto` rule: the middle-third layer where the two sets differ most, relative to
    the size of the activations there.

    Relative, because residual norms grow with depth: the raw difference norm would nearly always
    pick a late layer for its scale alone. The middle third, because early layers still carry
    token-level features of the particular prompts, and the last layers mostly write the next
    token: directions that steer a behaviour (refusal among them, Arditi et al. 2024) are found in
    the middle of the network. This is a heuristic without a judge in the loop: on SmolLM2-135M
    the relative difference of harmful vs harmless prompts grows almost monotonically with depth,
    so the rule lands at the top of the middle third (layer 19 of 30). The per-layer norms are
    saved so that a user can choose another layer with `--layer N`.
    """
    candidates = middle_third(len(relative_norms))
    return max(candidates, key=lambda i: (relative_norms[i], -i))


def model_sha256(model, tokenizer) -> str:
    """A hash of what fixes the residual stream's meaning: the architecture config and the vocabulary
    with its chat template (weights are not hashed: a fine-tuned checkpoint shares the directions)."""
    config = model.config.to_dict()
    for volatile in ("transformers_version", "torch_dtype", "dtype", "_name_or_path", "_commit_hash"):
        config.pop(volatile, None)
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def compute_direction(engine, positive: Sequence[str], negative: Sequence[str], *, layer: int | None = None,
                      system_prompt: str | None = None, sources: dict | None = None,
                      progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Per-layer difference of mean last-prompt-token residuals (positive minus negative), and the
    metadata of a direction file. `layer` None chooses by `choose_layer`."""
    if not positive or not negative:
        raise InputError("a steering direction needs at least one positive and one negative prompt")
    mean_pos, norm_pos = engine.mean_last_token_residuals(positive, system_prompt=system_prompt, progress=progress)
    mean_neg, norm_neg = engine.mean_last_token_residuals(negative, system_prompt=system_prompt, progress=progress)
    directions = (mean_pos - mean_neg).float()
    num_layers = directions.shape[0]
    diff_norms = (mean_pos - mean_neg).norm(dim=1)
    # Mean activation norm over both sets, each weighted by its size.
    act_norms = (norm_pos * len(positive) + norm_neg * len(negative)) / (len(positive) + len(negative))
    relative = (diff_norms / act_norms).tolist()
    if layer is None:
        chosen, rule = choose_layer(relative), "auto: largest |mean difference| / mean |activation| in the middle third"
    else:
        if not 0 <= layer < num_layers:
            raise InputError(f"layer {layer} is out of range: the model has layers 0..{num_layers - 1}", setting="layer")
        chosen, rule = layer, "given"
    if not diff_norms[chosen] > 0:
        raise InputError(f"the two prompt sets give the same mean activation at layer {chosen}: no direction")
    src = sources or {}
    metadata = {
        "layer": int(chosen),
        "layer_rule": rule,
        "model": engine.model_id,
        "model_sha256": model_sha256(engine.model, engine.tokenizer),
        "hidden_size": int(directions.shape[1]),
        "num_layers": int(num_layers),
        "diff_norms": [round(float(v), 6) for v in diff_norms],
        "activation_norms": [round(float(v), 6) for v in act_norms],
        "relative_norms": [round(float(v), 6) for v in relative],
        "positive": {"file": src.get("positive"), "count": len(positive)},
        "negative": {"file": src.get("negative"), "count": len(negative)},
        "system_prompt": system_prompt,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tailmon_version": __version__,
    }
    return directions, metadata
