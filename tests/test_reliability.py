"""Writing outputs: atomic, readable by others, no leftovers after a kill, never over an input.

The bad-input table (every command refusing mistakes in one line) is tests/test_bad_input.py.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli, save_tiny
from slimlm._io import (atomic_dir, atomic_write_text, check_writable_output, probe_writable,
                        remove_stale_temporaries)
from slimlm.errors import SlimlmError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _dead_pid() -> int:
    """The pid of a process that has finished (reuse within a test is very unlikely)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _killed_in(script: str, cwd: Path) -> None:
    """Run `script` in a fresh interpreter that SIGKILLs itself at its end (kill -9 mid-write)."""
    code = textwrap.dedent(script) + "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env)
    assert done.returncode == -signal.SIGKILL


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_killed_export_leaves_a_temporary_that_the_next_writer_removes(tmp_path, capsys):
    out = tmp_path / "model"
    _killed_in(f"""
        from slimlm._io import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            import os, signal
            os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.tmp-") and not out.exists()
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "removed" in err and left[0] in err


def test_a_killed_prune_is_cleaned_up_by_the_next_prune(tmp_path, capsys):
    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "work" / "pruned"
    out.parent.mkdir()
    # Killed while writing its shards: the temporary folder is what a real kill leaves.
    _killed_in(f"""
        import slimlm.prune as prune
        from safetensors.torch import save_file
        def save_then_die(tensors, path, metadata=None):
            save_file(tensors, path, metadata=metadata)
            import os, signal
            os.kill(os.getpid(), signal.SIGKILL)
        import safetensors.torch
        safetensors.torch.save_file = save_then_die
        from slimlm.cli import main
        main(["prune", {str(src)!r}, "-o", {str(out)!r}, "--hidden", "36", "--importance", "magnitude"])
    """, tmp_path)
    assert [p.name.split("-")[0] for p in out.parent.iterdir()] == [".pruned.tmp"]
    code, _, err = run_cli(["prune", src, "-o", out, "--hidden", "36", "--importance", "magnitude"], capsys)
    assert code == 0, err
    assert [p.name for p in out.parent.iterdir()] == ["pruned"]
    assert "removed" in err and "no longer running" in err


def test_temporaries_of_live_processes_and_of_other_outputs_are_kept(tmp_path):
    out = tmp_path / "model"
    from slimlm._io import _HOST

    live = tmp_path / f".model.tmp-{os.getpid()}-{_HOST}-abcd1234"  # this process: alive
    other_host = tmp_path / f".model.tmp-{_dead_pid()}-00000000-abcd1234"
    other_output = tmp_path / f".model2.tmp-{_dead_pid()}-{_HOST}-abcd1234"
    stale = tmp_path / f".model.tmp-{_dead_pid()}-{_HOST}-abcd1234"
    for p in (live, other_host, other_output, stale):
        p.mkdir()
    assert remove_stale_temporaries(out) == [stale]
    assert live.exists() and other_host.exists() and other_output.exists() and not stale.exists()


def test_an_output_moved_aside_by_a_killed_replacement_is_put_back(tmp_path, capsys):
    from slimlm._io import _HOST

    out = tmp_path / "model"
    aside = tmp_path / f".model.old-{_dead_pid()}-{_HOST}-abcd1234"
    aside.mkdir()
    (aside / "config.json").write_text("mine")
    # The up-front check sees the output again, so it is not replaced without --overwrite.
    with pytest.raises(SlimlmError, match="already exists"):
        check_writable_output(out)
    assert (out / "config.json").read_text() == "mine" and not aside.exists()
    assert "restored" in capsys.readouterr().err


@pytest.mark.parametrize("existing", ["file", "folder", None])
def test_replacing_leaves_no_old_copy(tmp_path, existing):
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("old")
    elif existing == "folder":
        out.mkdir()
        (out / "a").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and _listing(out) == ["b"]
    atomic_write_text(tmp_path / "note.txt", "one")
    atomic_write_text(tmp_path / "note.txt", "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt", "out"]


def test_a_folder_output_never_replaces_a_file_nor_the_reverse(tmp_path):
    (tmp_path / "scores.safetensors").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a").write_text("a")
    with pytest.raises(SlimlmError, match="is a file"):
        check_writable_output(tmp_path / "scores.safetensors", overwrite=True)
    with pytest.raises(SlimlmError, match="is a folder"):
        check_writable_output(tmp_path / "folder", overwrite=True, folder=False)


def test_outputs_get_the_umask_permissions(tmp_path, tiny_model_dir, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "pruned"
        code, _, err = run_cli(["prune", tiny_model_dir, "-o", out, "--hidden", "36", "--importance", "magnitude"],
                               capsys)
        assert code == 0, err
        modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
        assert modes["."] == 0o755
        assert all(m == (0o755 if (out / name).is_dir() else 0o644) for name, m in modes.items()), modes
        scores = tmp_path / "scores.safetensors"
        code, _, err = run_cli(["importance", tiny_model_dir, "-o", scores, "--importance", "magnitude"], capsys)
        assert code == 0, err
        assert stat.S_IMODE(scores.stat().st_mode) == 0o644
        os.umask(0o077)
        with atomic_dir(tmp_path / "private") as tmp:
            (tmp / "f").write_text("x")
        assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "private" / "f").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    # A replaced file keeps the mode it had.
    note = tmp_path / "note.txt"
    note.write_text("x")
    note.chmod(0o640)
    atomic_write_text(note, "y")
    assert stat.S_IMODE(note.stat().st_mode) == 0o640


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs holding a tiny model (as root, permission bits and os.access never refuse;
    a read-only mount does)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        save_tiny("llama", mount)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_writability_is_probed_by_creating_not_by_permission_bits(tmp_path, read_only_dir):
    for where in (read_only_dir / "out", read_only_dir / "deeper" / "out", Path("/proc/slimlm-out")):
        with pytest.raises(SlimlmError, match="cannot write"):
            probe_writable(where)
    before = _listing(tmp_path)
    probe_writable(tmp_path / "a" / "b" / "out")
    assert _listing(tmp_path) == before  # the probe leaves nothing and creates no parents


def test_read_only_places_are_refused_before_work(tmp_path, tiny_model_dir, text_file, read_only_dir, capsys):
    before = _listing(tmp_path)
    args = ["-t", tiny_model_dir, "-s", tiny_model_dir, "--data", text_file, "--tokens", "64", "--seq-len", "16"]
    code, _, err = run_cli(["distill", *args, "-o", tmp_path / "d", "--token-cache", read_only_dir / "cache"], capsys)
    assert code == 2 and "token cache" in err and err.count("\n") == 1
    code, _, err = run_cli(["distill", *args, "-o", read_only_dir / "d"], capsys)
    assert code == 2 and "cannot write" in err and err.count("\n") == 1
    code, _, err = run_cli(["card", read_only_dir], capsys)
    assert code == 2 and "cannot write the model card" in err and err.count("\n") == 1
    assert _listing(tmp_path) == before


def test_eval_of_a_model_in_a_read_only_folder_keeps_its_results_in_memory(read_only_dir, text_file, capsys,
                                                                          monkeypatch):
    code, out, err = run_cli(["eval", read_only_dir, "--ppl", text_file, "--seq-len", "16", "--max-tokens", "64",
                              "--json"], capsys)
    assert code == 0, err
    assert '"ppl"' in out and not (read_only_dir / "eval.json").exists()
    # Where the probe passes and the write fails anyway (the disk filled meanwhile): a warning, no crash.
    import slimlm.evaluate.runner as runner

    monkeypatch.setattr(runner, "can_write_into", lambda *a, **k: True)
    assert runner.save_results({"model": "m"}, read_only_dir) is None
    assert "results not saved" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["typer._click.exceptions", "click.exceptions"])
def test_usage_errors_of_either_click_are_one_line(module, monkeypatch, capsys):
    import slimlm.cli

    exceptions = pytest.importorskip(module)

    def raise_usage(*a, **k):
        raise exceptions.BadParameter("'abc' is not a valid integer.\nSecond line.")

    monkeypatch.setattr(slimlm.cli, "build_app", lambda: raise_usage)
    with pytest.raises(SystemExit) as exit_:
        slimlm.cli.main(["info", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "not a valid integer. Second line." in err


def test_custom_code_in_a_model_folder_never_runs(tmp_path, text_file, capsys):
    """A known family with auto_map loads with transformers' own class; a custom tokenizer class is refused."""
    import json

    marker = tmp_path / "CODE-RAN"
    model = save_tiny("llama", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\n")
    code, out, err = run_cli(["eval", model, "--ppl", text_file, "--seq-len", "16", "--max-tokens", "32", "--json"],
                             capsys)
    assert code == 0, err
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": ["custom.CustomTokenizer", None]})
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    code, out, err = run_cli(["eval", model, "--ppl", text_file, "--seq-len", "16", "--max-tokens", "32"], capsys)
    assert code == 2 and err.startswith("error: cannot load the tokenizer") and err.count("\n") == 1
    assert not marker.exists()


def test_info_needs_no_weights_but_work_on_a_model_does(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    code, _, err = run_cli(["info", folder], capsys)
    assert code == 0, err
    code, _, err = run_cli(["prune", folder, "-o", tmp_path / "out", "--hidden", "36", "--importance", "magnitude"],
                           capsys)
    assert code == 2 and "has no weights" in err
    # A sharded checkpoint whose index names a missing shard.
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (shard / "model.safetensors.index.json").write_text(
        '{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}')
    code, _, err = run_cli(["eval", shard, "--speed"], capsys)
    assert code == 2 and "model-00001-of-00002.safetensors, named in model.safetensors.index.json, is missing" in err


def test_a_search_that_fails_before_its_first_result_leaves_no_folder(tmp_path, monkeypatch):
    import slimlm.models
    from slimlm.search import search

    def broken(*a, **k):
        raise SlimlmError("cannot read the weights (simulated)")

    monkeypatch.setattr(slimlm.models, "load_model", broken)
    out = tmp_path / "search"
    with pytest.raises(SlimlmError, match="simulated"):
        search(str(save_tiny("llama", tmp_path / "m", max_position_embeddings=1024)), out, target_params=8e4,
               hidden_step=8, ffn_step=8)
    assert not out.exists()


def test_a_run_that_fails_before_its_first_stage_leaves_no_folder(tmp_path, text_file, monkeypatch):
    import errno

    import slimlm.pipeline
    from slimlm.recipe import parse_recipe

    teacher = save_tiny("llama", tmp_path / "m", max_position_embeddings=1024)
    recipe = parse_recipe(f"teacher: {teacher}\ndata: {text_file}\nprune:\n  hidden: 36\n", "r.yaml")

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slimlm.pipeline, "atomic_write_json", disk_full)
    with pytest.raises(OSError):
        slimlm.pipeline.run(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()
