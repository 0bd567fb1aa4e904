"""Importance for models larger than memory: decoder layers streamed one at a time give the in-memory scores."""

import json

import pytest
import torch

from conftest import ALL_FAMILIES, run_cli, save_tiny
from slimlm import api
from slimlm.errors import SlimlmError
from slimlm.streaming import LayerStream

CORPUS = ("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_streamed_scores_equal_in_memory_scores(tmp_path, family):
    model = save_tiny(family, tmp_path / family)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    kw = dict(data=str(corpus), calib_samples=6, seq_len=16, heldout=0, batch_size=4, progress=False)
    whole = api.importance(str(model), depth_loss=False, offload="none", **kw)
    streamed = api.importance(str(model), offload="layers", **kw)
    assert streamed.meta["streamed"] and "streamed" not in whole.meta
    for name in ("hidden", "ffn", "heads", "expert_ffn", "shared_ffn", "mamba_heads"):
        if getattr(whole, name) is not None:
            _close(getattr(streamed, name), getattr(whole, name))
    _close(streamed.depth_scores["bi"], whole.depth_scores["bi"])
    assert set(streamed.experts) == set(whole.experts)
    for kind in whole.experts:
        _close(streamed.experts[kind], whole.experts[kind])
    # the weight-magnitude baseline streams too
    whole_m = api.importance(str(model), kind="magnitude", offload="none", progress=False)
    streamed_m = api.importance(str(model), kind="magnitude", offload="layers", progress=False)
    for name in ("hidden", "ffn", "heads"):
        _close(getattr(streamed_m, name), getattr(whole_m, name))


def test_one_layer_in_memory_at_a_time(tmp_path):
    stream = LayerStream(save_tiny("llama", tmp_path / "m"))
    layers = stream.layers
    assert all(p.is_meta for layer in layers for p in layer.parameters())  # nothing loaded up front
    seen = []

    class Probe:
        def start_batch(self, batch):
            pass

        def attach(self, layer, i):
            seen.append([j for j, other in enumerate(layers) if not next(other.parameters()).is_meta])
            return []

    stream.run([torch.randint(4, 90, (2, 16))], Probe(), progress=False)
    assert seen == [[i] for i in range(len(layers))]
    assert all(p.is_meta for layer in layers for p in layer.parameters())


def test_automatic_when_the_model_does_not_fit(tmp_path, monkeypatch, capsys):
    import slimlm.streaming as streaming

    model = save_tiny("llama", tmp_path / "m")
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)  # bytes: nothing fits
    scores = api.importance(str(model), data=str(corpus), calib_samples=4, seq_len=16, heldout=0, progress=False)
    assert scores.meta["streamed"] and "loss" not in scores.depth_scores  # the whole-model metric is left out
    assert "streaming the decoder layers one at a time" in capsys.readouterr().err
    with pytest.raises(SlimlmError, match="'loss' depth metric .* cannot stream"):
        api.importance(str(model), data=str(corpus), calib_samples=4, seq_len=16, depth_loss=True, progress=False)


def test_prune_streams_and_slices_from_disk(tmp_path, capsys):
    """`slimlm prune --offload layers` with Block Importance: the same checkpoint as the in-memory prune."""
    model = save_tiny("qwen3_moe", tmp_path / "m")
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    args = ["--hidden", 32, "--layers", 3, "--depth-metric", "bi", "--data", corpus, "--calib-samples", 4,
            "--seq-len", 16, "--json"]
    code, out, err = run_cli(["prune", model, "-o", tmp_path / "streamed", "--offload", "layers", *args], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["sliced"] == "shard by shard"
    code, _, err = run_cli(["prune", model, "-o", tmp_path / "whole", "--offload", "none", *args], capsys)
    assert code == 0, err
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "streamed" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run_cli(["prune", model, "-o", tmp_path / "x", "--offload", "layers", "--layers", 3,
                            "--data", corpus, "--seq-len", 16], capsys)
    assert code == 2 and "cannot stream" in err and not (tmp_path / "x").exists()
