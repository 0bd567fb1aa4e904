"""`distill --teacher-logits CACHE`: training from a teacher-logits cache, checked against online distillation."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, save_tiny

from slimlm.distill import distill
from slimlm.distill import trainer as trainer_module
from slimlm.distill.teacher_logits import TeacherLogitsCache, teacher_topk, write_cache
from slimlm.errors import SlimlmError
from slimlm.models import load_model

SEQ = 16
STEPS = 4
COMMON = dict(seq_len=SEQ, heldout=4, seed=3)  # what the cache and the distillations share
RUN = dict(micro_batch=4, tokens=STEPS * 4 * SEQ, progress=False, tensorboard=False, **COMMON)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher-logits")
    teacher = str(save_tiny("llama", root / "teacher"))
    student = str(save_tiny("llama", root / "student", num_hidden_layers=2))
    corpus = root / "corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20)
    caches = {}
    for k in (8, 96):  # 96: the whole vocabulary
        caches[k] = str(root / f"cache-{k}")
        write_cache(teacher, caches[k], data=str(corpus), tokens=RUN["tokens"], top_k=k, progress=False, **COMMON)
    return {"teacher": teacher, "student": student, "data": str(corpus), "cache": caches, "root": root}


@pytest.fixture
def recorded(monkeypatch):
    """Every batch the trainer feeds the model (training and validation), with the student's weights then."""
    calls = []
    real = trainer_module.model_forward

    def recording(model, batch, device, metrics=False):
        student = getattr(model, "module", model).objective.hf_model
        ids = batch.ids if hasattr(batch, "ids") else torch.as_tensor(batch)
        calls.append({"metrics": metrics, "ids": ids.clone(), "targets": getattr(batch, "targets", None),
                      "weights": None if metrics else copy.deepcopy(student.state_dict())})
        return real(model, batch, device, metrics)

    monkeypatch.setattr(trainer_module, "model_forward", recording)
    return calls


def _records(out, event):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ---- the windows and the targets -----------------------------------------------------------------
def test_the_cache_run_trains_on_the_online_runs_windows_with_the_teachers_topk(setup, tmp_path, recorded):
    kw = dict(lr=1e-3, eval_every=2, **RUN)
    distill(setup["teacher"], setup["student"], setup["data"], tmp_path / "online", **kw)
    online = list(recorded)
    recorded.clear()
    distill(None, setup["student"], setup["data"], tmp_path / "cached", teacher_logits=setup["cache"][8], **kw)
    cached = list(recorded)
    # Same batches in the same order: training windows step by step, validation windows at the same steps.
    assert [c["metrics"] for c in cached] == [c["metrics"] for c in online]
    assert len([c for c in cached if not c["metrics"]]) == STEPS
    for a, b in zip(online, cached):
        assert torch.equal(a["ids"], b["ids"])
    teacher = load_model(setup["teacher"], dtype="float32")
    for call in cached:
        want = teacher_topk(teacher, call["ids"], 8)
        assert torch.equal(call["targets"].topk_ids, want.topk_ids)
        torch.testing.assert_close(call["targets"].topk_logprobs.float(), want.topk_logprobs, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(call["targets"].rest_logmass.float(), want.rest_logmass, rtol=1e-3, atol=1e-3)


# ---- the loss --------------------------------------------------------------------------------------
def _hand_topk_loss(student, ids, targets, ce_weight):
    """Top-K + rest-bucket forward KL (teacher side renormalised) plus ce_weight x CE, from the full logits in fp64."""
    logits = student(ids).logits.double()
    logq = logits.log_softmax(-1)
    logp = targets.topk_logprobs.double()
    logr = targets.rest_logmass.double()
    total = torch.logaddexp(logp.logsumexp(-1), logr)
    logp, logr = logp - total.unsqueeze(-1), logr - total
    logq_k = logq.gather(-1, targets.topk_ids)
    q_rest = 1 - logq_k.exp().sum(-1)
    kl = (logp.exp() * (logp - logq_k)).sum(-1) + logr.exp() * (logr - q_rest.log())
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return kl.mean().item(), ce.item(), (kl.mean() + ce_weight * ce).item()


def test_training_losses_equal_a_hand_computation_of_the_topk_kl(setup, tmp_path, recorded):
    out = tmp_path / "cached"
    distill(None, setup["student"], setup["data"], out, teacher_logits=setup["cache"][8], lr=3e-3, warmup=0,
            eval_every=0, ce_weight=0.5, **RUN)
    train = _records(out, "train")
    calls = [c for c in recorded if not c["metrics"]]
    assert len(train) == len(calls) == STEPS
    student = load_model(setup["student"], dtype="float32")
    for record, call in zip(train, calls):
        student.load_state_dict(call["weights"])
        with torch.no_grad():
            kl, ce, loss = _hand_topk_loss(student, call["ids"], call["targets"], 0.5)
        assert record["kl"] == pytest.approx(kl, rel=1e-5)
        assert record["ce"] == pytest.approx(ce, rel=1e-5)
        assert record["loss"] == pytest.approx(loss, rel=1e-5)


def test_validation_is_the_topk_kl_of_the_heldout_windows(setup, tmp_path, recorded):
    out = tmp_path / "cached"
    result = distill(None, setup["student"], setup["data"], out, teacher_logits=setup["cache"][8], eval_every=STEPS,
                     **RUN)
    first = _records(out, "eval")[0]
    assert first["step"] == 0 and first["val_kl_top_k"] == 8
    held = [c for c in recorded if c["metrics"]][0]
    student = load_model(setup["student"], dtype="float32")
    with torch.no_grad():
        kl, ce, _ = _hand_topk_loss(student, held["ids"], held["targets"], 0.0)
    assert first["val_kl"] == pytest.approx(kl, rel=1e-5) and first["val_lm_loss"] == pytest.approx(ce, rel=1e-5)
    meta = json.loads((out / "slimlm.json").read_text())
    assert meta["loss"]["top_k"] == 8 and meta["teacher"] is None and "top 8" in meta["loss"]["validation"]
    assert result.metrics["val_kl_top_k"] == 8


def test_a_whole_vocabulary_cache_trains_like_online_distillation(setup, tmp_path):
    """K = vocabulary: the cached loss is the full forward KL, up to the cache's float16 log-probabilities.

    float16 keeps 11 significant bits: a log-probability l is stored within |l| x 2^-11 (about
    5e-4 relative), so each token's KL moves by about that much of its size; the tolerance is 1e-3
    relative on the losses of a few steps (measured: at most 3.5e-4).
    """
    kw = dict(lr=3e-3, warmup=0, eval_every=2, **RUN)
    distill(setup["teacher"], setup["student"], setup["data"], tmp_path / "online", **kw)
    distill(None, setup["student"], setup["data"], tmp_path / "cached", teacher_logits=setup["cache"][96], **kw)
    for event, key in (("train", "kl"), ("eval", "val_kl"), ("eval", "val_lm_loss")):
        online = [r[key] for r in _records(tmp_path / "online", event)]
        cached = [r[key] for r in _records(tmp_path / "cached", event)]
        assert len(online) == len(cached) > 1
        assert cached == pytest.approx(online, rel=1e-3), (event, key)


def test_resume_from_the_cache_gives_the_same_weights(setup, tmp_path):
    kw = dict(teacher_logits=setup["cache"][8], lr=2e-3, warmup=1, eval_every=2, save_every=0, **RUN)
    distill(None, setup["student"], setup["data"], tmp_path / "a", **kw)
    part = distill(None, setup["student"], setup["data"], tmp_path / "b", stop_after=2, **kw)
    assert not part.complete and part.steps == 2
    done = distill(None, setup["student"], setup["data"], tmp_path / "b", resume=True, **kw)
    assert done.complete and done.steps == STEPS
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _records(tmp_path / "a", "train")] == [r["loss"] for r in _records(tmp_path / "b",
                                                                                                    "train")]
    # Another cache is another run: resuming with it is refused.
    with pytest.raises(SlimlmError, match="different settings"):
        distill(None, setup["student"], setup["data"], tmp_path / "b", resume=True,
                **{**kw, "teacher_logits": setup["cache"][96]})


def test_the_named_teacher_is_checked_not_loaded(setup, tmp_path, monkeypatch):
    loaded = []
    real = trainer_module.load_model
    monkeypatch.setattr(trainer_module, "load_model", lambda spec, *a, **k: loaded.append(spec) or real(spec, *a, **k))
    distill(setup["teacher"], setup["student"], setup["data"], tmp_path / "o", teacher_logits=setup["cache"][8],
            eval_every=0, **RUN)
    assert loaded == [setup["student"]]


# ---- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,match", [
    ("missing", "not a teacher-logits cache"),
    ("damaged", "is damaged"),
    ("seed", "written for another seed"),
    ("seq_len", "written for another seq_len"),
    ("data", "written for another sources"),
    ("teacher", "written for another teacher"),
    ("tokens", "slimlm teacher-logits .* --tokens 2048"),
    ("temperature", "--temperature 1"),
    ("hidden", "hidden states"),
    ("mode", "needs mode 'kd'"),
    ("loss", "forward KL"),
])
def test_mismatches_are_refused_in_one_line_before_any_output(setup, tmp_path, capsys, case, match):
    cache = setup["cache"][8]
    args = ["distill", "--student", setup["student"], "-o", tmp_path / "o", "--data", setup["data"],
            "--seq-len", SEQ, "--heldout", 4, "--seed", 3, "--tokens", RUN["tokens"], "-q"]
    if case == "missing":
        cache = tmp_path / "nowhere"
    elif case == "damaged":
        import shutil

        cache = tmp_path / "damaged"
        shutil.copytree(setup["cache"][8], cache)
        (cache / "source-0" / "00000.topk_logprobs.npy").write_bytes(b"not an array")
    elif case == "seed":
        args[args.index("--seed") + 1] = 4
    elif case == "seq_len":
        args[args.index("--seq-len") + 1] = 32
    elif case == "data":
        other = tmp_path / "other.txt"
        other.write_text("sphinx of black quartz, judge my vow. " * 200)
        args[args.index("--data") + 1] = other
    elif case == "teacher":
        args += ["--teacher", save_tiny("llama", tmp_path / "other-teacher", num_hidden_layers=3)]
    elif case == "tokens":
        args[args.index("--tokens") + 1] = 2048
    elif case == "temperature":
        args += ["--temperature", 2]
    elif case == "hidden":
        args += ["--hidden-loss", "cosine"]
    elif case == "mode":
        args += ["--mode", "lm"]
    elif case == "loss":
        args += ["--loss", "jsd"]
    capsys.readouterr()  # what setting up printed
    code, out, err = run_cli(args + ["--teacher-logits", cache], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_the_cli_trains_from_the_cache_without_a_teacher(setup, tmp_path, capsys):
    code, out, err = run_cli(["distill", "--student", setup["student"], "-o", tmp_path / "o", "--data", setup["data"],
                              "--seq-len", SEQ, "--heldout", 4, "--seed", 3, "--tokens", RUN["tokens"], "-q",
                              "--teacher-logits", setup["cache"][8], "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["complete"] and result["steps"] == STEPS and result["metrics"]["val_kl_top_k"] == 8
    assert TeacherLogitsCache.open(setup["cache"][8]).top_k == 8


# ---- under Accelerate ------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_fsdp2_from_the_cache_is_killed_resumes_and_follows_one_process(setup, tmp_path):
    """Two FSDP2 CPU processes train from the cache (no teacher anywhere), are killed after step 3 and resume from
    step 2; losses and validation agree with one plain process (tolerances of test_distill_multiprocess)."""
    from test_distill_multiprocess import SHARDED, _launch

    kwargs = {**SHARDED, "seed": COMMON["seed"]}
    cache = tmp_path / "cache"
    write_cache(setup["teacher"], cache, data=setup["data"], tokens=kwargs["tokens"], seq_len=kwargs["seq_len"],
                global_batch=kwargs["global_batch"], heldout=kwargs["heldout"], seed=kwargs["seed"], top_k=8,
                progress=False)
    kwargs["teacher_logits"] = str(cache)
    distill(None, setup["student"], setup["data"], tmp_path / "one", **kwargs)
    spec = dict(teacher=None, student=setup["student"], data=setup["data"], out=str(tmp_path / "two"), kwargs=kwargs,
                kill_after_step=3)
    killed = _launch("fsdp2_8gpu.yaml", spec, tmp_path, "killed")
    assert killed.returncode != 0 and not (tmp_path / "two" / "slimlm.json").exists()
    resumed = _launch("fsdp2_8gpu.yaml", {**spec, "kwargs": {**kwargs, "resume": True}, "kill_after_step": None},
                      tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step-00000002" in resumed.stderr
    meta = json.loads((tmp_path / "two" / "slimlm.json").read_text())
    assert meta["hyperparameters"]["distributed"] == "FSDP" and meta["loss"]["top_k"] == 8
    for event, key in (("train", "loss"), ("eval", "val_kl"), ("eval", "val_lm_loss")):
        one = [r[key] for r in _records(tmp_path / "one", event)]
        two = [r[key] for r in _records(tmp_path / "two", event)]
        assert len(one) == len(two) > 0
        assert two == pytest.approx(one, rel=1e-5), (event, key)


# ---- the search and `slimlm run` -------------------------------------------------------------------
SEARCH = dict(target_params=70000, tolerance=0.15, max_candidates=3, reduction=2, search_budget=2048, hidden_step=12,
              ffn_step=16)


def test_search_distills_every_candidate_from_the_cache(setup, tmp_path, monkeypatch):
    from slimlm import search as search_module
    from slimlm.adapters import get_adapter
    from slimlm.config import DistillConfig, SearchConfig
    from slimlm.models import load_config

    d = DistillConfig(seq_len=SEQ, micro_batch=4, global_batch=8, warmup=1, heldout=4, seed=3)
    tokens = search_module.search_tokens(get_adapter(load_config(setup["teacher"])), SearchConfig(**SEARCH), d)
    assert 0 < tokens < SEARCH["search_budget"] and tokens % (8 * SEQ) == 0  # the last rung's steps
    cache = tmp_path / "cache"
    write_cache(setup["teacher"], cache, data=setup["data"], tokens=tokens // 2, global_batch=8, top_k=8,
                progress=False, **COMMON)
    kw = dict(data=setup["data"], seq_len=SEQ, micro_batch=4, global_batch=8, warmup=1, heldout=4, seed=3,
              calib_samples=4, progress=False, **SEARCH)
    with pytest.raises(SlimlmError, match="extend it"):  # too short for the search: refused before any output
        search_module.search(setup["teacher"], tmp_path / "s", teacher_logits=str(cache), **kw)
    assert not (tmp_path / "s").exists()
    write_cache(setup["teacher"], cache, data=setup["data"], tokens=tokens, global_batch=8, top_k=8, progress=False,
                **COMMON)
    teachers = []
    real = search_module._distill_candidate

    def spy(teacher, student, folder, data, config, *a, **k):
        teachers.append(config.teacher_logits)
        return real(teacher, student, folder, data, config, *a, **k)

    monkeypatch.setattr(search_module, "_distill_candidate", spy)
    result = search_module.search(setup["teacher"], tmp_path / "s", teacher_logits=str(cache), **kw)
    assert teachers and set(teachers) == {str(cache)}
    assert all(row["val_kl"] is not None for rows in result["rungs"] for row in rows)
    meta = json.loads((tmp_path / "s" / "winner" / "slimlm.json").read_text())
    assert meta["teacher"] is None and meta["loss"]["top_k"] == 8


def test_run_writes_the_cache_once_for_the_search_and_the_distill_stage(setup, tmp_path, capsys):
    from slimlm.distill import teacher_logits as tl

    recipe = tmp_path / "tl.yaml"
    recipe.write_text(f"""
teacher: {setup["teacher"]}
data: {setup["data"]}
seed: 3
importance: {{calib_samples: 4, seq_len: 32, heldout: 2}}
search: {{{", ".join(f"{k}: {v}" for k, v in SEARCH.items())}}}
teacher_logits: {{top_k: 8}}
distill: {{tokens: 512, seq_len: {SEQ}, micro_batch: 4, global_batch: 8, warmup: 1, heldout: 4}}
eval: {{ppl: {setup["data"]}, max_tokens: 128, seq_len: 32}}
""")
    out = tmp_path / "run"
    code, _, err = run_cli(["run", recipe, "-o", out], capsys)
    assert code == 0, err
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages)[:4] == ["correct", "importance", "teacher_logits", "prune"]
    assert stages["teacher_logits"]["top_k"] == 8
    cache = TeacherLogitsCache.open(out / "teacher-logits")
    assert cache.manifest["stream"]["tokens"] > 512  # the search's budget, larger than distill's 512
    student = json.loads((out / "student" / "slimlm.json").read_text())
    assert student["loss"]["teacher_logits"] == str(out / "teacher-logits") and student["loss"]["top_k"] == 8
    assert student["teacher"] == setup["teacher"]  # named and checked against the cache, not loaded
    winner = json.loads((out / "search" / "winner" / "slimlm.json").read_text())
    assert winner["loss"]["top_k"] == 8
    # Rerun: nothing is redone; a new K rewrites the cache and redoes what follows.
    code, _, err = run_cli(["run", recipe, "-o", out], capsys)
    assert code == 0 and "stage" not in err
    recipe.write_text(recipe.read_text().replace("top_k: 8", "top_k: 16"))
    code, _, err = run_cli(["run", recipe, "-o", out], capsys)
    assert code == 0, err
    assert "stage teacher_logits" in err and "stage distill" in err and "stage importance" not in err
    assert tl.TeacherLogitsCache.open(out / "teacher-logits").top_k == 16
