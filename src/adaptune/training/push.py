"""``adaptune train --push-to-hub REPO``: upload the saved adapter folder (with its model card) to
the Hugging Face hub through ``huggingface_hub``, after it is on disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import EnvironmentProblem

# what stays local: checkpoints to resume from, trackers' logs, temporary files
IGNORED = ["checkpoint-*", "checkpoint-*/**", "runs/**", "wandb/**", "mlruns/**", ".*", "**/.*"]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def offline_note(repo: str) -> str | None:
    """What to say before training when the push cannot happen (the run still saves locally)."""
    if _offline():
        return f"note: HF_HUB_OFFLINE is set: the adapter will be saved but not pushed to {repo}"
    return None


def push_adapter(folder: str | os.PathLike, repo: str, say: Callable[[str], None]) -> str:
    """Create ``repo`` if needed and upload ``folder`` to it; returns the repo's URL.

    Raises EnvironmentProblem (one line; the folder is untouched) when offline or the upload fails.
    """
    folder = Path(folder)
    later = f"the adapter is saved in {folder}; upload it later with `hf upload {repo} {folder}`"
    if _offline():
        raise EnvironmentProblem(f"--push-to-hub {repo}: HF_HUB_OFFLINE=1 is set, so nothing was uploaded; {later}")
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        url = api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, ignore_patterns=IGNORED,
                          commit_message="Upload adapter trained with adaptune")
    except Exception as exc:  # noqa: BLE001 - network, auth, permissions: one line, the run's files stay
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EnvironmentProblem(f"--push-to-hub {repo}: upload failed ({type(exc).__name__}: {text}); "
                                 f"{later}") from None
    say(f"pushed {folder} to {url}")
    return str(url)
