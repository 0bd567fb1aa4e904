"""Model cards (README.md with Hugging Face metadata) and `slimlm push` (hub mocked or offline)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import save_tiny, run_cli



run = run_cli


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny model pruned by slimlm, from a source whose card names its license."""
    from slimlm import api

    root = tmp_path_factory.mktemp("card")
    source = save_tiny("llama", root / "source")
    (source / "README.md").write_text("---\nlicense: mit\n---\n# a tiny model\n")
    corpus = root / "corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 5)
    out = root / "pruned"
    api.prune(str(source), out, hidden=36, ffn=40, heads=3, layers=3, data=str(corpus), calib_samples=4, seq_len=32,
              heldout=2, progress=False)
    return out


def test_prune_writes_a_card_that_parses_as_hub_metadata(pruned, capsys):
    from huggingface_hub import ModelCard

    card = ModelCard.load(pruned / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["slimlm", "minitron", "pruned"] and data["license"] == "mit"
    assert "base_model" not in data  # a local source has no hub id
    assert "| llama | 3 | 36 | 40 | 3 | 3 | 12 | 96 |" in card.text and "**Pruned**" in card.text
    assert "# pruned" in card.text  # the final name, not the temporary folder's

    # After `slimlm eval` saved results, `slimlm card` adds them.
    (pruned / "eval.json").write_text(json.dumps({
        "perplexity": {"ppl": 12.5, "tokens": 256}, "tasks": {"mc_local": {"acc": 0.25, "acc_stderr": 0.05}},
        "speed": {"decode_tokens_per_s": 99.0}, "device": "cpu", "dtype": "float32"}))
    code, _, err = run(["card", pruned], capsys)
    assert code == 0, err
    text = (pruned / "README.md").read_text()
    assert "| perplexity | 12.5 |" in text and "| mc_local acc | 0.25 | ± 0.05 |" in text
    assert "| decode tokens/s | 99 |" in text


def test_card_follows_the_lineage_to_the_hub_model(tmp_path):
    from huggingface_hub import ModelCard

    from slimlm.card import write_model_card

    folder = save_tiny("llama", tmp_path / "aligned")
    prune = {"stage": "prune", "source": "smollm2-135m", "plan": {"source_shape": {"hidden": 576},
                                                                  "target_shape": {"hidden": 384}}}
    distill = {"kind": "distill", "teacher": "smollm2-135m", "student": str(tmp_path / "pruned"), "data": "d.txt",
               "tokens": 1000, "loss": {"kind": "kl", "temperature": 1.0}, "parent": prune}
    align = {"kind": "align", "source": str(tmp_path / "distilled"), "sft": {"data": "s.jsonl", "tokens": 10},
             "dpo": None, "parent": distill}
    (folder / "slimlm.json").write_text(json.dumps(align))
    write_model_card(folder, strict=True)
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert card.data.tags == ["slimlm", "minitron", "pruned", "distilled", "sft"]
    assert card.text.index("**Pruned**") < card.text.index("**Distilled**") < card.text.index("**Instruction-tuned")


def test_a_readme_not_written_by_slimlm_is_kept(tmp_path, capsys):
    from slimlm.card import write_model_card

    folder = save_tiny("llama", tmp_path / "m")
    (folder / "README.md").write_text("my own card\n")
    assert write_model_card(folder) is None
    code, _, err = run(["card", folder], capsys)
    assert code == 2 and "not written by slimlm" in err
    assert (folder / "README.md").read_text() == "my own card\n"


# ---- push ------------------------------------------------------------------------------------
class FakeApi:
    calls: list = []
    fail = None

    def __init__(self, token=None):
        self.token = None

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))
        if FakeApi.fail is not None:
            raise FakeApi.fail
        return SimpleNamespace(url=f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))
        return SimpleNamespace(oid="abc123")


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    FakeApi.calls, FakeApi.fail = [], None
    return FakeApi


def test_push_uploads_the_folder_without_run_state(pruned, online, capsys):
    code, out, err = run(["push", pruned, "me/tiny-pruned", "--private", "--json"], capsys)
    assert code == 0, err
    (_, repo, kw), (_, upload) = online.calls
    assert repo == "me/tiny-pruned" and kw["private"] is True
    assert upload["folder_path"] == str(pruned) and upload["repo_id"] == "me/tiny-pruned"
    assert "run/**" in upload["ignore_patterns"]
    assert json.loads(out.strip().splitlines()[-1])["commit"] == "abc123"
    assert 'from_pretrained("me/tiny-pruned")' in (pruned / "README.md").read_text()


def test_push_errors_are_one_line(pruned, online, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    response = SimpleNamespace(status_code=401, headers={}, request=None)
    online.fail = HfHubHTTPError("401 Client Error: Unauthorized", response=response)
    code, _, err = run(["push", pruned, "me/x"], capsys)
    assert code == 2 and "refused the token" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, _, err = run(["push", pruned, "me/x"], capsys)
    assert code == 2 and "not logged in" in err

    code, _, err = run(["push", pruned, "not a repo"], capsys)
    assert code == 2 and "REPO_ID must look like" in err

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = run(["push", pruned, "me/x"], capsys)
    assert code == 2 and "offline mode" in err and len(err.strip().splitlines()) == 1


def test_push_offline_for_real(pruned, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["push", pruned, "me/x"], capsys)
    assert code == 2 and err.strip() == "error: cannot push: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set)"
