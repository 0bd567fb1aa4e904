"""Distillation engine: the chunked loss, the trainer, resume, validation and the CLI (tiny models, CPU)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny, tiny_model, tiny_tokenizer

from slimlm.data import pack_windows
from slimlm.distill import distill, kd_loss, naive_kd_loss
from slimlm.distill.loss import CheckpointedKDLoss, FusedKDLoss, PlainKDLoss
from slimlm.distill.trainer import NonFiniteLossError
from slimlm.errors import SlimlmError
from slimlm.training.schedule import effective_warmup, schedule

SEQ = 32
FAST = dict(seq_len=SEQ, micro_batch=4, progress=False, tensorboard=False)


# ---- the loss ------------------------------------------------------------------------------
def _loss_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, hs, ht, v = 45, 16, 24, 50
    return dict(
        hs=torch.randn(n, hs, generator=g, dtype=dtype).requires_grad_(),
        w=(0.5 * torch.randn(v, hs, generator=g, dtype=dtype)).requires_grad_(),
        b=(0.1 * torch.randn(v, generator=g, dtype=dtype)).requires_grad_(),
        ht=torch.randn(n, ht, generator=g, dtype=dtype),
        wt=0.5 * torch.randn(v, ht, generator=g, dtype=dtype),
        labels=torch.where(torch.rand(n, generator=g) < 0.2, -100, torch.randint(0, v, (n,), generator=g)),
        mask=torch.rand(n, generator=g) > 0.25,
    )


LOSS_CLASSES = [FusedKDLoss, CheckpointedKDLoss, PlainKDLoss]


@pytest.mark.parametrize("loss_class", LOSS_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", ["kl", "reverse-kl", "jsd", "none"])
@pytest.mark.parametrize("temperature,ce_weight,softcap", [(1.0, 0.0, None), (2.0, 0.5, None), (2.0, 0.5, 3.0)])
def test_chunked_loss_equals_full_logit_loss(kind, temperature, ce_weight, softcap, loss_class):
    """Each loss class gives the naive full-logit loss and its gradients (values and autograd of `naive_kd_loss`)."""
    x = _loss_inputs()
    loss_fn = loss_class(kind, temperature, ce_weight, chunk_size=8)
    out = loss_fn(x["hs"], x["w"], x["ht"], x["wt"], student_bias=x["b"], labels=x["labels"], mask=x["mask"],
                  student_softcap=softcap)
    # a non-unit upstream gradient (as under loss scaling / accumulation) must scale every gradient
    grads = torch.autograd.grad(out.loss * 3.0, [x["hs"], x["w"], x["b"]])
    s_logits = x["hs"] @ x["w"].T + x["b"]
    if softcap:
        s_logits = torch.tanh(s_logits / softcap) * softcap
    ref = naive_kd_loss(s_logits, x["ht"] @ x["wt"].T, labels=x["labels"], mask=x["mask"],
                        loss=kind, temperature=temperature, ce_weight=ce_weight)
    ref_grads = torch.autograd.grad(ref * 3.0, [x["hs"], x["w"], x["b"]])
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert out.n_tokens == int(x["mask"].sum())
    ref_kl = naive_kd_loss(s_logits.detach(), x["ht"] @ x["wt"].T, mask=x["mask"], loss="kl", temperature=temperature)
    torch.testing.assert_close(out.kl, ref_kl / temperature**2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused,recompute,want", [(True, True, FusedKDLoss), (False, True, CheckpointedKDLoss),
                                                  (False, False, PlainKDLoss)])
def test_kd_loss_picks_the_class(monkeypatch, fused, recompute, want):
    called = []
    for cls in LOSS_CLASSES:
        original = cls.compute
        monkeypatch.setattr(cls, "compute", lambda self, x, original=original: called.append(type(self)) or
                            original(self, x))
    x = _loss_inputs()
    kd_loss(x["hs"], x["w"], x["ht"], x["wt"], chunk_size=8, fused=fused, recompute=recompute)
    assert called[0] is want


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,ce_weight", [("kl", 0.5), ("jsd", 0.0)])
def test_fused_loss_under_bf16_autocast_matches_plain_autograd(device, kind, ce_weight):
    """Mixed precision (how the trainer runs on GPUs): the head matmuls run in bf16 like a Linear's would.

    Reference: the naive loss on the full logits of a plain `F.linear` under the same autocast,
    differentiated by autograd. Both round the same matmuls to bf16, so they agree to bf16 precision.
    """
    x = {k: v.to(device) for k, v in _loss_inputs().items()}
    leaves = [x[k].detach().requires_grad_() for k in ("hs", "w", "b")]
    with torch.autocast(device, dtype=torch.bfloat16):
        out = kd_loss(leaves[0], leaves[1], x["ht"], x["wt"], student_bias=leaves[2], labels=x["labels"],
                      loss=kind, ce_weight=ce_weight, chunk_size=16)
        grads = torch.autograd.grad(out.loss, leaves)
        s_logits = F.linear(leaves[0], leaves[1], leaves[2])
        assert s_logits.dtype == torch.bfloat16
        ref = naive_kd_loss(s_logits, F.linear(x["ht"], x["wt"]), labels=x["labels"], loss=kind, ce_weight=ce_weight)
        ref_grads = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(out.loss.float(), ref.float(), rtol=1e-2, atol=1e-3)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-3)


def test_fused_forward_kl_with_a_soft_capped_teacher_and_ignored_labels():
    """The by-hand forward-KL path (teacher cap, T != 1, CE with ignored labels) against the naive loss."""
    x = _loss_inputs()
    out = kd_loss(x["hs"], x["w"], x["ht"], x["wt"], student_bias=x["b"], labels=x["labels"], loss="kl",
                  temperature=1.5, ce_weight=0.3, chunk_size=16, teacher_softcap=2.0)
    grads = torch.autograd.grad(out.loss, [x["hs"], x["w"], x["b"]])
    t_logits = torch.tanh((x["ht"] @ x["wt"].T) / 2.0) * 2.0
    ref = naive_kd_loss(x["hs"] @ x["w"].T + x["b"], t_logits, labels=x["labels"], temperature=1.5, ce_weight=0.3)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, torch.autograd.grad(ref, [x["hs"], x["w"], x["b"]])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_fused_loss_through_a_tied_linear_module():
    """A head tied to the embeddings (SmolLM2) gets the sum of both gradients, as with plain autograd."""
    x = _loss_inputs(torch.float64)
    emb = torch.nn.Embedding(50, 16, dtype=torch.float64)
    head = torch.nn.Linear(16, 50, bias=False, dtype=torch.float64)
    head.weight = emb.weight
    ids = torch.randint(0, 50, (45,), generator=torch.Generator().manual_seed(1))

    def run(fused):
        emb.zero_grad()
        hs = emb(ids) * 2 + x["hs"].detach()
        out = kd_loss(hs, head, x["ht"], x["wt"], chunk_size=16, fused=fused)
        out.loss.backward()
        return out.loss.detach(), emb.weight.grad.clone()

    (l1, g1), (l2, g2) = run(True), run(False)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


def test_chunked_loss_by_hand_and_with_teacher_logits_and_modules():
    x = _loss_inputs(torch.float64)
    p = F.log_softmax(x["ht"] @ x["wt"].T, -1)
    q = F.log_softmax(x["hs"] @ x["w"].T, -1)
    by_hand = (p.exp() * (p - q)).sum(-1).mean()  # forward KL, no mask, T = 1
    head = torch.nn.Linear(16, 50, bias=False, dtype=torch.float64)
    head.weight.data.copy_(x["w"].detach())
    a = kd_loss(x["hs"], x["w"], x["ht"], x["wt"], chunk_size=7)
    b = kd_loss(x["hs"], head, teacher_logits=x["ht"] @ x["wt"].T, chunk_size=1000)
    torch.testing.assert_close(a.loss, by_hand, rtol=1e-10, atol=0)
    torch.testing.assert_close(b.loss, by_hand, rtol=1e-10, atol=0)
    torch.testing.assert_close(a.kl, by_hand.detach(), rtol=1e-10, atol=0)
    whole = kd_loss(x["hs"], x["w"], x["ht"], x["wt"], chunk_size=0)  # one chunk, no recomputation
    torch.testing.assert_close(whole.loss, by_hand, rtol=1e-10, atol=0)


def test_chunked_loss_keeps_no_logits_for_backward():
    n, h, v = 256, 16, 2000
    hs, w = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    ht, wt = torch.randn(n, h), torch.randn(v, h)

    def saved_bytes(recompute, fused):
        """Bytes of the tensors the returned loss's graph still holds for backward."""
        saved = []

        def pack(t):
            saved.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = kd_loss(hs, w, ht, wt, chunk_size=32, recompute=recompute, fused=fused)
        gc.collect()
        alive = {id(t): t for t in (r() for r in saved) if t is not None}
        del out
        return sum(t.numel() * t.element_size() for t in alive.values())

    one_logit_tensor = n * v * 4
    assert saved_bytes(True, fused=False) < one_logit_tensor / 10  # only the hidden-state chunks
    assert saved_bytes(False, fused=False) > one_logit_tensor
    # fused: only gradients the size of the hidden states and of the head weight
    assert saved_bytes(True, fused=True) == (n * h + v * h) * 4


def test_bad_loss_name():
    x = _loss_inputs()
    with pytest.raises(SlimlmError, match="unknown loss"):
        kd_loss(x["hs"], x["w"], x["ht"], x["wt"], loss="mse")


def test_schedule_warmup_and_cosine():
    assert effective_warmup(40, 1000) == 40 and effective_warmup(40, 50) == 5 and effective_warmup(40, 3) == 0
    lrs = [schedule(s, 100, 1e-4, 1e-5, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 1e-5 and lrs[-1] < 1.1e-5


# ---- the trainer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-models")
    teacher = save_tiny("llama", root / "teacher")
    student = save_tiny("llama", root / "student", num_hidden_layers=2)  # a "depth-pruned" random student
    corpus = root / "corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20)
    return {"teacher": str(teacher), "student": str(student), "data": str(corpus), "root": root}


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_distill_lowers_kl_and_exports_a_standard_checkpoint(models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = distill(models["teacher"], models["student"], models["data"], out, tokens=6 * 4 * SEQ,
                     lr=3e-3, eval_every=3, heldout=4, **FAST)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[-1]["val_kl"] < 0.8 * evals[0]["val_kl"]
    assert len([r for r in records if r["event"] == "train"]) == 6
    assert result.complete and result.steps == 6 and result.tokens == 6 * 4 * SEQ
    assert result.metrics["val_kl"] == pytest.approx(evals[-1]["val_kl"])

    meta = json.loads((out / "slimlm.json").read_text())
    assert meta["teacher"] == models["teacher"] and meta["loss"]["kind"] == "kl"
    assert meta["hyperparameters"]["warmup_steps"] == 0 and meta["final_metrics"]["val_kl"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and "_slimlm_source" not in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").exists() and meta["data"] == models["data"]


def test_student_objective_fused_and_checkpointed_give_the_same_gradients():
    """The trainer's two loss paths (fused: single process / DDP; checkpointed: FSDP2 / ZeRO-3) on a real model."""
    from slimlm.distill.modules import StudentObjective, TeacherForward, lm_head

    teacher = TeacherForward(tiny_model("llama", seed=1, num_hidden_layers=3))
    ids = torch.randint(4, 96, (3, SEQ))
    t_hidden, _ = teacher(ids)
    grads = []
    for fused in (True, False):
        student = tiny_model("llama", num_hidden_layers=2)  # same seed: same weights (tied head included)
        out = StudentObjective(student, ce_weight=0.3, temperature=1.5, chunk_size=16, fused=fused)(
            ids, t_hidden, {}, lm_head(teacher.hf_model))
        out["loss"].backward()
        grads.append((out["loss"].detach(), [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lm_mode_loss_is_cross_entropy(models, tmp_path):
    from slimlm.distill.data import WindowOrder
    from slimlm.distill.modules import StudentObjective

    student = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(4, 96, (3, SEQ))
    want = F.cross_entropy(student(ids).logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    got = StudentObjective(student, mode="lm", chunk_size=16)(ids)["loss"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # End to end: the first logged loss is the CE of the untouched student on the first batch.
    records = []
    distill(None, student, models["data"], tmp_path / "lm", tokens=2 * 4 * SEQ, mode="lm", eval_every=0,
            save_every=0, tokenizer=tiny_tokenizer(), on_step=records.append, dtype="fp32", **FAST)
    # 8 windows needed, no held-out: the first 8 windows of the packed text, in the seeded order.
    windows = pack_windows(models["data"], tiny_tokenizer(), SEQ, None).input_ids[:8]
    first = windows[torch.from_numpy(WindowOrder(8, 0).indices(0, 4))]
    start = tiny_model("llama", num_hidden_layers=2)
    want = F.cross_entropy(start(first).logits[:, :-1].reshape(-1, 96), first[:, 1:].reshape(-1))
    assert records[0]["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert "kl" not in records[0]


def test_resume_gives_the_same_weights(models, tmp_path):
    """4 steps straight vs 2 steps, stop, resume: bitwise equal on one CPU process (same ops, same order)."""
    kw = dict(tokens=4 * 4 * SEQ, lr=2e-3, warmup=1, eval_every=0, save_every=0, **FAST)
    distill(models["teacher"], models["student"], models["data"], tmp_path / "a", **kw)
    part = distill(models["teacher"], models["student"], models["data"], tmp_path / "b", stop_after=2, **kw)
    assert not part.complete and part.steps == 2 and not (tmp_path / "b" / "slimlm.json").exists()
    done = distill(models["teacher"], models["student"], models["data"], tmp_path / "b", resume=True, **kw)
    assert done.complete and done.steps == 4
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_with_other_settings_is_refused(models, tmp_path):
    kw = dict(tokens=4 * 4 * SEQ, eval_every=0, save_every=0, **FAST)
    distill(models["teacher"], models["student"], models["data"], tmp_path / "r", stop_after=1, **kw)
    with pytest.raises(SlimlmError, match="different settings"):
        distill(models["teacher"], models["student"], models["data"], tmp_path / "r", resume=True,
                **{**kw, "seq_len": 16})
    with pytest.raises(SlimlmError, match="unfinished run"):
        distill(models["teacher"], models["student"], models["data"], tmp_path / "r", **kw)
    with pytest.raises(SlimlmError, match="nothing to resume"):
        distill(models["teacher"], models["student"], models["data"], tmp_path / "new", resume=True, **kw)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(models, tmp_path):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(models["student"])

    def poison(record):
        if record["step"] == 3:
            with torch.no_grad():
                student.model.norm.weight.fill_(float("nan"))

    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="step 4.*step-00000002"):
        distill(models["teacher"], student, models["data"], out, tokens=6 * 4 * SEQ, eval_every=0, save_every=2,
                tokenizer=tiny_tokenizer(), on_step=poison, **FAST)
    assert (out / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").exists()
    assert not (out / "slimlm.json").exists()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "error"


def test_a_run_that_fails_before_its_first_checkpoint_removes_what_it_wrote(models, tmp_path):
    """NaN at step 1: no metrics.jsonl, run/config.json or TensorBoard files are left, so the rerun needs no flag."""
    from transformers import AutoModelForCausalLM

    broken = AutoModelForCausalLM.from_pretrained(models["student"])
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    kw = dict(tokens=4 * 4 * SEQ, eval_every=2, heldout=4, save_every=2, tokenizer=tiny_tokenizer(),
              **{**FAST, "tensorboard": True})
    out = tmp_path / "new"
    with pytest.raises(NonFiniteLossError, match="step 1.*no checkpoint was written yet"):
        distill(models["teacher"], broken, models["data"], out, **kw)
    assert not out.exists()
    # an output folder that existed (empty) before the run is kept, empty
    (tmp_path / "empty").mkdir()
    with pytest.raises(NonFiniteLossError):
        distill(models["teacher"], broken, models["data"], tmp_path / "empty", **kw)
    assert list((tmp_path / "empty").iterdir()) == []
    # the corrected rerun needs neither --overwrite nor --resume
    assert distill(models["teacher"], models["student"], models["data"], out, **kw).complete


class _Payload:
    """A pickle that creates `path` when it is unpickled: stands for any code a crafted file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_pickles(folder, marker, names):
    import pickle

    for name in names:
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))


def test_resume_never_unpickles_files_of_the_run_folder(models, tmp_path):
    """Accelerate's pickle names (custom objects, RNG, optimizer, scheduler) planted in a checkpoint are never read."""
    import pickle

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is live: unpickling it runs code
    assert probe.exists()

    marker = tmp_path / "pwned"
    kw = dict(tokens=4 * 4 * SEQ, lr=2e-3, warmup=1, eval_every=0, save_every=0, **FAST)
    distill(models["teacher"], models["student"], models["data"], tmp_path / "a", **kw)
    part = distill(models["teacher"], models["student"], models["data"], tmp_path / "b", stop_after=2, **kw)
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step-00000002"
    assert part.checkpoint == str(ckpt)
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin", ".pt", ".pth")]  # nothing pickled
    _plant_pickles(ckpt, marker, ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin",
                                  "scheduler.bin", "pytorch_model.bin", "scaler.pt"])
    done = distill(models["teacher"], models["student"], models["data"], tmp_path / "b", resume=True, **kw)
    assert done.complete and not marker.exists()
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the resume is still exact

    # A checkpoint in Accelerate's pickled layout (an older slimlm) is refused in one line, unread.
    distill(models["teacher"], models["student"], models["data"], tmp_path / "c", stop_after=2, **kw)
    old = tmp_path / "c" / "run" / "checkpoints" / "step-00000002"
    for f in old.glob("optimizer.*"):
        f.unlink()
    _plant_pickles(old, marker, ["optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"])
    with pytest.raises(SlimlmError, match="older slimlm"):
        distill(models["teacher"], models["student"], models["data"], tmp_path / "c", resume=True, **kw)
    assert not marker.exists()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_in_memory_bf16_student_trains_fp32_master_weights_like_one_from_disk(models, tmp_path, dtype):
    """A bf16 model object (e.g. pruned in memory from a bf16 teacher) follows the precision rules of a path:
    AdamW steps fp32 weights (bf16 only as autocast compute), the export is in the compute dtype."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama", num_hidden_layers=2).to(torch.bfloat16).save_pretrained(tmp_path / "disk-student")
    tiny_tokenizer().save_pretrained(tmp_path / "disk-student")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "disk-student", dtype=torch.bfloat16)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    kw = dict(tokens=2 * 4 * SEQ, lr=2e-3, warmup=1, eval_every=0, save_every=0, dtype=dtype, **FAST)
    dtypes, mem, disk = [], [], []

    def watch(record):
        dtypes.append({p.dtype for p in student.parameters()})
        mem.append(record["loss"])

    distill(models["teacher"], student, models["data"], tmp_path / "mem", tokenizer=tiny_tokenizer(), on_step=watch,
            **kw)
    distill(models["teacher"], str(tmp_path / "disk-student"), models["data"], tmp_path / "disk",
            on_step=lambda r: disk.append(r["loss"]), **kw)
    assert dtypes == [{torch.float32}] * 2  # trained in place, as fp32 master weights
    assert mem == disk
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "disk")
    assert {v.dtype for v in a.values()} == {torch.bfloat16 if dtype == "bf16" else torch.float32}
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_hidden_cosine_loss_with_a_narrower_student(models, tmp_path):
    from transformers import AutoModelForCausalLM

    narrow = save_tiny("llama", tmp_path / "narrow", num_hidden_layers=2, hidden_size=36)
    records = []
    distill(models["teacher"], str(narrow), models["data"], tmp_path / "h", tokens=2 * 4 * SEQ, eval_every=0,
            save_every=0, hidden_loss="cosine", layer_map="0:1,1:3", on_step=records.append, **FAST)
    assert 0 < records[0]["hidden"] <= 2 and records[0]["loss"] > records[0]["kd"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "h")  # the projection is not exported
    assert json.loads((tmp_path / "h" / "slimlm.json").read_text())["loss"]["layer_map"] == [[0, 1], [1, 3]]


def test_gradient_checkpointing_and_unchunked_loss_train_the_same(models, tmp_path):
    """Both options only trade memory for time: the first steps' losses match the default run."""
    kw = dict(tokens=4 * SEQ, eval_every=0, save_every=0, **FAST)
    runs = []
    for i, extra in enumerate([{}, {"gradient_checkpointing": True, "chunk_size": 0}]):
        records = []
        distill(models["teacher"], models["student"], models["data"], tmp_path / f"g{i}", on_step=records.append,
                **kw, **extra)
        runs.append([r["loss"] for r in records])
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model or the data gets loaded: errors must come first."""
    import slimlm.distill.trainer as trainer

    def boom(*a, **k):
        raise AssertionError("work started before validation finished")

    monkeypatch.setattr(trainer, "load_model", boom)
    monkeypatch.setattr(trainer, "build_training_data", boom)


@pytest.mark.parametrize("case,match", [
    ("empty", "no text|holds no|no readable"),
    ("seq", "max_position_embeddings"),
    ("out", "is a file"),
    ("loss", "unknown loss"),
    ("hidden", "unknown hidden loss"),
    ("batch", "not a multiple"),
    ("layer_map", "bad layer pair"),
    ("vocab", "vocabularies differ"),
    ("tokenizer", "tokenizers differ"),
])
def test_bad_inputs_fail_before_work(models, tmp_path, no_work, case, match):
    args = dict(teacher=models["teacher"], student=models["student"], data=models["data"], out=tmp_path / "o",
                tokens=1000, **FAST)
    if case == "empty":
        (tmp_path / "empty.txt").write_text("  \n")
        args["data"] = str(tmp_path / "empty.txt")
    elif case == "seq":
        args["seq_len"] = 256
    elif case == "out":
        (tmp_path / "file").write_text("x")
        args["out"] = tmp_path / "file" / "o"
    elif case == "loss":
        args["loss"] = "mse"
    elif case == "hidden":
        args["hidden_loss"] = "mse"
    elif case == "batch":
        args["global_batch"] = 6
    elif case == "layer_map":
        args.update(hidden_loss="cosine", layer_map="0:9")
    elif case == "vocab":
        args["student"] = str(save_tiny("llama", tmp_path / "v", vocab_size=128))
    elif case == "tokenizer":
        student = save_tiny("llama", tmp_path / "t")
        vocab_file = tmp_path / "t" / "tokenizer.json"
        data = json.loads(vocab_file.read_text())
        vocab = data["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, different ids
        vocab_file.write_text(json.dumps(data))
        args["student"] = str(student)
    with pytest.raises(SlimlmError, match=match):
        distill(**args)
    assert not (tmp_path / "o").exists()


# ---- the command line ----------------------------------------------------------------------
def _cli(argv, capsys):
    from slimlm.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_distill_and_correct_teacher(models, tmp_path, capsys):
    import slimlm.cli

    names = {c.name for c in slimlm.cli.build_app().registered_commands}
    assert {"distill", "correct-teacher"} <= names
    common = ["--data", models["data"], "--seq-len", str(SEQ), "--micro-batch", "4", "--eval-every", "0",
              "--json", "-q"]
    code, out, err = _cli(["distill", "--teacher", models["teacher"], "--student", models["student"], "-o",
                           str(tmp_path / "d"), "--tokens", "256", "--loss", "jsd", *common], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["complete"] and result["steps"] == 2 and result["mode"] == "kd"
    assert json.loads((tmp_path / "d" / "slimlm.json").read_text())["loss"]["kind"] == "jsd"
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:  # TensorBoard logs only when it is installed
        assert list((tmp_path / "d" / "run" / "tensorboard").glob("events.out.tfevents.*"))

    code, out, err = _cli(["correct-teacher", models["teacher"], "-o", str(tmp_path / "c"), "--tokens", "0.128k",
                           *common], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "c" / "slimlm.json").read_text())
    assert meta["kind"] == "lm-training" and meta["hyperparameters"]["lr"] == 1e-5
    assert json.loads(out.strip().splitlines()[-1])["mode"] == "lm"


@pytest.mark.parametrize("extra,match", [(["--loss", "mse"], "unknown loss"), (["--tokens", "lots"], "--tokens")])
def test_cli_user_errors_exit_2(models, tmp_path, capsys, extra, match):
    code, out, err = _cli(["distill", "--teacher", models["teacher"], "--student", models["student"], "-o",
                           str(tmp_path / "x"), "--data", models["data"], *extra], capsys)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_python_m_slimlm_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "slimlm", "distill", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--teacher" in done.stdout and "--layer-map" in done.stdout
