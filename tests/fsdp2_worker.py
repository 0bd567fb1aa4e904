"""Run under `torchrun` (gloo, CPU): three steps of the trainer's two modules sharded with FSDP2 as
Accelerate's `fsdp2_prepare_model` lays them out (decoder layers as units; final norm, embeddings
and LM head as one unit kept gathered after forward; the wrapper as root).

`python fsdp2_worker.py OUT_DIR [--plain]`: each process writes its losses as JSON to its own file,
OUT_DIR/rank-<rank>.json (one shared stdout interleaves the processes' lines). Used by
tests/test_distill_multiprocess.py; with `--plain` the same steps run without sharding (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402

from slimlm.distill.modules import StudentObjective, TeacherForward, decoder, lm_head  # noqa: E402


def shard(wrapper, mesh):
    from torch.distributed.fsdp import fully_shard

    hf = wrapper.hf_model
    for layer in decoder(hf).layers:
        fully_shard(layer, mesh=mesh)
    emb, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    tied = emb.weight is head.weight
    if not tied:
        fully_shard(emb, mesh=mesh)
    tail = [decoder(hf).norm, emb, head] if tied else [decoder(hf).norm, head]
    fully_shard(tail, mesh=mesh, reshard_after_forward=False)
    fully_shard(wrapper, mesh=mesh)
    return wrapper


def main():
    plain = "--plain" in sys.argv
    torch.manual_seed(0)
    teacher = TeacherForward(tiny_model("llama"))
    student = StudentObjective(tiny_model("llama", num_hidden_layers=2), fused=plain, chunk_size=8)
    if not plain:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        teacher, student = shard(teacher, mesh), shard(student, mesh)
    t_head = lm_head(teacher.hf_model)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    ids = torch.randint(4, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        t_hidden, taps = teacher(ids)
        out = student(ids, t_hidden, taps, t_head)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"].item())
    with torch.no_grad():
        val = student(ids, *teacher(ids), t_head, metrics=True).tolist()
    out = Path(sys.argv[1]) / f"rank-{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps({"losses": losses, "val": val}))
    if not plain:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
