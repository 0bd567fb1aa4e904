"""Importance for models larger than memory: the decoder layers stream from the checkpoint, one at a time.

The model is built on the meta device (no weights) with its buffers real; the embeddings and the
final norm are loaded.  One cheap pass through the model, with every decoder layer replaced by a
recorder that passes its input through, captures what each layer is called with (the embedding
output, position embeddings, the attention mask of its layer type) for every calibration batch.
Then, layer by layer: its tensors are read from the safetensors shards (through transformers' own
checkpoint conversion, so merged experts, renamed prefixes and fused projections load exactly as
`from_pretrained` loads them), the importance hooks are attached, every batch's hidden states go
through it, and it is released.  Memory: one layer, the embeddings, and the calibration hidden
states.  The scores equal those of the in-memory pass (the same hooks see the same activations).

Depth metrics that need whole-model forwards with layers removed (`loss`, `block`) cannot stream;
Block Importance (`bi`) comes from the same pass.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter
from .errors import SlimlmError
from .models import decoder


@contextlib.contextmanager
def _quiet_loading():
    """transformers prints a progress bar per load call; one per layer is noise."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class _Recorder(nn.Module):
    """Stands in for a decoder layer during the capture pass: records its call, passes the hidden states on."""

    def __init__(self, layer: nn.Module, index: int, calls: dict, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: the real layer stays where it is
        self.index, self.calls, self.as_tuple = index, calls, as_tuple

    def __getattr__(self, name):  # the model's loop may read the layer's attributes (attention_type, block_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.setdefault(self.index, []).append((hidden, args[1:], kwargs))
        return (hidden,) if self.as_tuple else hidden


class LayerStream:
    """A causal LM whose decoder layers are read from its safetensors checkpoint one at a time."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .prune import checkpoint_shards, open_safetensors

        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import convert_and_load_state_dict_in_model
            from transformers.modeling_utils import LoadStateDictConfig
        except ImportError as exc:  # transformers 4.x loads checkpoints another way
            raise SlimlmError(f"streaming layers needs transformers 5 ({exc})") from None
        self._convert, self._config_cls = convert_and_load_state_dict_in_model, LoadStateDictConfig
        self.path, self.dtype = Path(path), dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        files = checkpoint_shards(self.path)
        if not files:
            raise SlimlmError(f"{self.path} has no safetensors weights to stream layer by layer")
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        self.adapter = get_adapter(config)
        with init_empty_weights(include_buffers=False):  # rotary frequencies and other buffers stay real
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.mapping = get_model_conversion_mapping(self.model)
        self._files = [open_safetensors(f) for f in files]
        self._where = {k: f for f in self._files for k in f.keys()}
        self.layers = self.adapter.layers(self.model)
        n = len(self.layers)
        self._layer_of = {}
        pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.")
        for key in self._where:
            m = pattern.search(key)
            if m and int(m.group(1)) < n:
                self._layer_of[key] = int(m.group(1))
        head = {"lm_head.weight", "lm_head.bias"}
        self._load([k for k in self._where if k not in self._layer_of and k not in head])
        self.model.tie_weights()  # a tied LM head is the embedding just loaded
        for buf_owner in self.model.modules():  # buffers built on the CPU follow the compute device
            for name, buf in list(buf_owner.named_buffers(recurse=False)):
                if buf.device != self.device and not buf.is_meta:
                    setattr(buf_owner, name, buf.to(self.device))

    def _load(self, keys: list[str]) -> None:
        state = {k: self._where[k].get_slice(k) for k in keys}
        device_map = {"": self.device}
        with _quiet_loading():
            self._convert(self.model, state, self._config_cls(dtype=self.dtype, weight_mapping=self.mapping,
                                                             device_map=device_map))

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer `i` with its weights (call `release` when done)."""
        self._load([k for k, layer in self._layer_of.items() if layer == i])
        layer = self.layers[i]
        missing = [n for n, p in layer.named_parameters() if p.is_meta]
        if missing:
            raise SlimlmError(f"layer {i} of {self.path} lacks tensors for {', '.join(missing[:3])} in its checkpoint")
        return layer

    def release(self, i: int) -> None:
        self.layers[i].to("meta")

    def layer_tensors(self):
        """(in-memory name, tensor) of every decoder layer's weights, one layer in memory at a time."""
        prefix = self.adapter.layers_path
        for i in range(len(self.layers)):
            layer = self.load_layer(i)
            for name, t in layer.state_dict().items():
                yield f"{prefix}.{i}.{name}", t
            self.release(i)

    @torch.inference_mode()
    def capture(self, batches: list[torch.Tensor]) -> dict[int, list]:
        """What each decoder layer is called with, per batch: {layer: [(hidden, args, kwargs), ...]}."""
        for as_tuple in (False, True):
            calls: dict[int, list] = {}
            recorders = nn.ModuleList([_Recorder(layer, i, calls, as_tuple) for i, layer in enumerate(self.layers)])
            self.adapter.set_layers(self.model, recorders)
            try:
                for batch in batches:
                    decoder(self.model)(input_ids=batch.to(self.device), use_cache=False)
            except (IndexError, TypeError, RuntimeError):
                if as_tuple:
                    raise
                continue  # the model's loop unpacks a tuple from each layer: record again, returning one
            finally:
                self.adapter.set_layers(self.model, self.layers)
            # The model's loop hands each layer what the previous one returned: when it unpacks a
            # tuple instead, layer 1 does not receive layer 0's hidden states; try the other way.
            if len(self.layers) < 2 or all(calls[1][b][0] is calls[0][b][0] for b in range(len(batches))):
                return calls
        raise SlimlmError(f"cannot stream the layers of {self.model.config.model_type}: its layers' outputs are not "
                          "passed on as they are")

    def outside_tensors(self):
        """(name, tensor) of the weights outside the decoder layers (embeddings, norms, an untied LM head)."""
        head = self.model.get_output_embeddings()
        keys = [k for k in ("lm_head.weight", "lm_head.bias") if k in self._where]
        if head is not None and head.weight.is_meta and keys:  # untied (whatever the config says): its own tensor
            self._load(keys)
        prefix = self.adapter.layers_path + "."
        for name, t in self.model.state_dict().items():
            if not name.startswith(prefix) and not t.is_meta:
                yield name, t

    @torch.inference_mode()
    def run(self, batches: list[torch.Tensor], collectors=None, progress: bool = True) -> None:
        """Every batch through every layer, layer-major; `collectors` (`importance.ActivationCollectors`)
        attach their hooks to each layer while it is loaded."""
        calls = self.capture(batches)
        hidden = [h for h, _, _ in calls[0]]
        for i in tqdm(range(len(self.layers)), desc="importance (streamed layers)", unit="layer", disable=not progress):
            layer = self.load_layer(i)
            handles = collectors.attach(layer, i) if collectors is not None else []
            try:
                for b, (_, args, kwargs) in enumerate(calls[i]):
                    if collectors is not None:
                        collectors.start_batch(batches[b])
                    out = layer(hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
            finally:
                for h in handles:
                    h.remove()
                self.release(i)


def model_bytes(config, dtype: torch.dtype) -> int:
    """Memory the model's weights take in `dtype` (from the config: a meta-device model)."""
    from .memory import parameter_count

    return parameter_count(config)["total"] * torch.empty((), dtype=dtype).element_size()


def available_memory() -> int | None:
    """Bytes this process can still use: free GPU memory, else MemAvailable."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def should_stream(config, dtype: torch.dtype, margin: float = 0.8) -> bool:
    """True when the weights alone would take more than `margin` of the memory available now."""
    free = available_memory()
    return free is not None and model_bytes(config, dtype) > margin * free


def streamed_scores(path, kind: str, windows: torch.Tensor | None = None, *, aggregation=("mean", "l2"),
                    batch_size: int = 8, progress: bool = True, dtype: torch.dtype = torch.float32):
    """`importance.activation_scores` (kind 'activation') or `magnitude_scores` (kind 'magnitude') of the
    checkpoint at `path`, one decoder layer in memory at a time."""
    import itertools

    from .importance import ActivationCollectors, magnitude_scores

    stream = LayerStream(path, dtype)
    config = stream.model.config
    if kind == "magnitude":
        return magnitude_scores(config, tensors=itertools.chain(stream.outside_tensors(), stream.layer_tensors()))
    collectors = ActivationCollectors(stream.adapter, aggregation)
    stream.run(list(windows.split(batch_size)), collectors, progress)
    scores = collectors.scores()
    if scores.experts:
        scores.experts["magnitude"] = magnitude_scores(config, experts_only=True,
                                                       tensors=stream.layer_tensors()).experts["magnitude"]
    return scores
