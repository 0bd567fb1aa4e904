"""`slimlm report`: every section from a fake run folder; the HTML's images load in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.evaluate.report import collect_run, write_report

L, C, F, H = 4, 48, 80, 6


def write_scores(path, with_depth=True, **drop):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "hidden": torch.rand(C, generator=g) + 0.1,
        "hidden_sites": torch.rand(2 * L, C, generator=g),
        "ffn": torch.rand(L, F, generator=g),
        "heads": torch.rand(L, H, generator=g),
    }
    if with_depth:
        tensors.update(depth_bi=torch.rand(L, generator=g), depth_loss=torch.rand(L, generator=g))
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    meta = {"importance": "activation", "block_losses": {"2": [3.1, 2.9, 3.4]}}
    save_file(tensors, str(path), metadata={"slimlm": json.dumps(meta)})


def make_run(root):
    """A run as the pipeline leaves it: scores, a pruned and a distilled model, a teacher elsewhere."""
    root.mkdir()
    write_scores(root / "scores.safetensors")
    teacher = root.parent / "teacher"
    teacher.mkdir()
    (teacher / "eval.json").write_text(json.dumps({
        "model": "teacher", "parameters": 134_515_008, "perplexity": {"ppl": 28.1},
        "tasks": {"hellaswag_local": {"acc": 0.4, "acc_norm": 0.46}},
        "speed": {"prefill_tokens_per_s": 250.0, "decode_tokens_per_s": 20.0, "peak_mem_mb": 700.0}}))
    pruned = root / "pruned"
    pruned.mkdir()
    (pruned / "slimlm.json").write_text(json.dumps({"stage": "prune", "source": str(teacher)}))
    student = root / "distilled"
    student.mkdir()
    (student / "eval.json").write_text(json.dumps({
        "model": "distilled", "parameters": 67_000_000, "perplexity": {"ppl": 35.2},
        "tasks": {"hellaswag_local": {"acc": 0.33, "acc_norm": 0.38}},
        "speed": {"prefill_tokens_per_s": 480.0, "decode_tokens_per_s": 37.0, "peak_mem_mb": 400.0}}))
    lines = [json.dumps({"event": "train", "step": s, "tokens": 512 * s, "loss": 3 / s, "kl": 2.5 / s}) for s in range(1, 21)]
    lines += [json.dumps({"event": "eval", "step": s, "tokens": 512 * s, "val_kl": 2 / s, "val_lm_loss": 4 / s, "val_ppl": 9.0})
              for s in (5, 10, 20)]
    lines.insert(3, "not json {")
    (student / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One full report (rendering is the slow part), shared by the checks below."""
    run = make_run(tmp_path_factory.mktemp("r") / "run")
    return run, write_report(run)


def test_report_has_every_section(report):
    run, out = report
    names = {p.split("/")[-1] for p in out["images"]}
    assert names == {f"scores0_{n}.png" for n in ("layers", "blocks", "heads", "neurons", "hidden", "hidden_sites")} | {
        "metrics0_train.png", "metrics0_validation.png"}
    md = (run / "report" / "report.md").read_text()
    for name in names:
        assert f"]({name})" in md and (run / "report" / name).stat().st_size > 1000
    html = (run / "report" / "report.html").read_text()
    assert html.count("<img ") == len(names) and html.count("data:image/png;base64,") == len(names)
    assert "src='http" not in html and "src=\"http" not in html  # nothing to fetch: opens offline
    # Before/after: the teacher (found through pruned/slimlm.json) first, then the student.
    rows = re.findall(r"^\| (teacher|distilled) \|.*$", md, re.M)
    assert rows == ["teacher", "distilled"]
    assert "134.5M" in md and "35.2" in md and "0.38" in md and "(1.92x)" in md
    assert "measured on different" not in md  # both rows say nothing about their settings


def test_table_warns_when_models_were_measured_differently(tmp_path):
    run = tmp_path / "run"
    for name, source in (("a", "wiki.txt"), ("b", "other.txt")):
        (run / name).mkdir(parents=True)
        (run / name / "eval.json").write_text(json.dumps({"model": name, "parameters": 1, "perplexity": {"ppl": 2.0, "source": source, "seq_len": 512}}))
    write_report(run)
    assert "Perplexities were measured on different text or settings" in (run / "report" / "report.md").read_text()


def test_missing_sections_are_skipped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_scores(run / "scores.safetensors", with_depth=False, ffn=True, hidden_sites=True)
    (run / "other_scores.safetensors").write_bytes(b"not a safetensors file")
    out = write_report(run)
    assert sorted(p.split("/")[-1] for p in out["images"]) == ["scores0_blocks.png", "scores0_heads.png", "scores0_hidden.png"]
    assert "Before / after" not in (run / "report" / "report.md").read_text()
    assert len(collect_run(run).scores) == 1


def test_report_mistakes(tmp_path):
    with pytest.raises(SlimlmError, match="not found"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimlmError, match="nothing to report"):
        write_report(tmp_path / "empty")
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"model": "m", "parameters": 10}))
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("x")
    with pytest.raises(SlimlmError, match="not a slimlm report folder"):
        write_report(run, tmp_path / "precious")
    write_report(run)
    write_report(run)  # rewriting its own report folder is fine


CHECK_IMAGES = """<script>
window.addEventListener('load', () => {
  const ok = [...document.images].map(i => (i.complete && i.naturalWidth > 0) ? '1' : '0').join('');
  document.body.setAttribute('data-images', ok);
});
</script></body>"""


def test_images_load_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install -y chromium)")
    _, out = report
    page = tmp_path / "check.html"
    page.write_text(open(out["html"]).read().replace("</body>", CHECK_IMAGES))
    profile = tmp_path / "profile"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    flags = re.search(r'data-images="([01]*)"', dom)
    assert flags is not None, dom[-2000:]
    assert flags.group(1) == "1" * len(out["images"])


def test_search_rungs_are_tables_and_candidate_curves_are_left_out(tmp_path):
    from slimlm.search import LADDER_FILE, Rung, write_rung

    run = tmp_path / "run"
    search = run / "search"
    search.mkdir(parents=True)
    (search / LADDER_FILE).write_text("{}")

    def row(name, kl, steps, rung):
        return {"candidate": name, "layers": 4, "hidden": 48, "ffn": 64, "heads": 6, "kv_heads": 3, "params": 90_000,
                "rung": rung, "steps": steps, "val_kl": kl, "val_lm_loss": 4.0}

    write_rung(search, Rung(0, 3, 1, 1), [row("A", 0.5, 1, 0), row("B", 0.6, 1, 0), row("C", 0.9, 1, 0)], kept=2)
    write_rung(search, Rung(1, 2, 3, 4), [row("B", 0.3, 4, 1), row("A", 0.4, 4, 1)], kept=1)
    curve = search / "candidates" / "A" / "student"
    curve.mkdir(parents=True)
    (curve / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 1.0}) + "\n")
    out = write_report(run)
    assert out["metrics"] == [] and out["searches"] == [str(search)]
    md = (run / "report" / "report.md").read_text()
    assert "### Search (search), rung 0: 3 candidates at 1 steps" in md
    rows = re.findall(r"^\| (\d) \| ([ABC]) \|.*\| ([a-z]*) \|$", md, re.M)
    assert rows == [("1", "A", "yes"), ("2", "B", "yes"), ("3", "C", ""), ("1", "B", "winner"), ("2", "A", "")]
    assert "<h3>Search (search), rung 1: 2 candidates at 4 steps</h3>" in (run / "report" / "report.html").read_text()
