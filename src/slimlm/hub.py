"""Sharing a checkpoint: `slimlm push OUT REPO_ID` (Hugging Face Hub) and `slimlm card OUT` (refresh its model card)."""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

import typer

from ._cli import JsonOut, emit_json
from .errors import SlimlmError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Run state (checkpoints, caches, TensorBoard) and hidden files stay local.
IGNORE = ["run/**", ".*", "**/.*", "*.tmp-*"]


def _offline() -> bool:
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or env


def _hub_error(exc: Exception, repo_id: str) -> str:
    """One line for whatever the hub client raised."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return "cannot push: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set)"
    if isinstance(exc, LocalTokenNotFoundError):
        return "cannot push: not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN)"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return "cannot push: the Hugging Face Hub refused the token (run `hf auth login` or set HF_TOKEN)"
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return f"cannot push to {repo_id}: permission denied for this token"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (ConnectionError, TimeoutError)) or "connect" in type(exc).__name__.lower():
        return f"cannot reach the Hugging Face Hub ({first})"
    return f"push to {repo_id} failed: {first}"


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, card: bool = True) -> dict:
    """Upload a checkpoint folder to the hub as `repo_id` (created if needed), its model card refreshed first.

    The run state under ``run/`` is left out.  Any hub problem (offline, not logged in, no
    permission) is a one-line `SlimlmError`.
    """
    from .models import check_checkpoint

    folder = check_checkpoint(folder, weights=True)
    if not _REPO_ID.match(repo_id):
        raise SlimlmError(f"REPO_ID must look like USER/NAME or ORG/NAME, got '{repo_id}'")
    if _offline():
        raise SlimlmError("cannot push: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set)")
    import huggingface_hub

    api = huggingface_hub.HfApi()
    if not (api.token or huggingface_hub.get_token()):
        raise SlimlmError("cannot push: not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN)")
    if card:
        from .card import write_model_card

        try:
            write_model_card(folder, repo_id)
        except OSError as exc:  # a read-only checkpoint is still uploaded, with the card it has
            print(f"warning: model card not refreshed ({exc.strerror or exc})", file=sys.stderr, flush=True)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   ignore_patterns=IGNORE, commit_message=f"Upload {folder.name} (slimlm)")
    except Exception as exc:  # the hub client raises many types (HTTP, connection, auth)
        raise SlimlmError(_hub_error(exc, repo_id)) from None
    url = str(getattr(repo, "url", "") or f"https://huggingface.co/{repo_id}")
    return {"repo_id": repo_id, "url": url, "private": private, "folder": str(folder),
            "commit": getattr(commit, "oid", None) or str(commit)}


def register(app: typer.Typer) -> None:
    """Add `push` and `card` to the slimlm CLI."""

    @app.command("push")
    def push_cmd(
        folder: str = typer.Argument(..., help="A checkpoint folder written by slimlm (prune, distill, align)."),
        repo_id: str = typer.Argument(..., help="The hub repository: USER/NAME or ORG/NAME (created if needed)."),
        private: bool = typer.Option(False, "--private", help="Create the repository as private."),
        no_card: bool = typer.Option(False, "--no-card", help="Do not refresh README.md before uploading."),
        as_json: JsonOut = False,
    ):
        """Upload a checkpoint to the Hugging Face Hub, with its model card (run state stays local)."""
        result = push(folder, repo_id, private=private, card=not no_card)
        print(f"pushed {folder} to {result['url']}")
        if as_json:
            emit_json(result)

    @app.command("card")
    def card_cmd(
        folder: str = typer.Argument(..., help="A checkpoint folder written by slimlm."),
        repo_id: Optional[str] = typer.Option(None, "--repo-id", help="The hub name to show in the usage example."),
        as_json: JsonOut = False,
    ):
        """Write or refresh the model card (README.md), e.g. after `slimlm eval` saved results."""
        from .card import refresh_card

        written = refresh_card(folder, repo_id)
        print(f"model card written to {written}")
        if as_json:
            emit_json({"card": str(written)})
