"""Experiment trackers for ``adaptune train --report-to``: transformers' own integrations
(TensorBoard, Weights & Biases, MLflow), with their local files under the output folder.

transformers writes TensorBoard event files under ``<output>/runs`` by itself. W&B and MLflow are
told where to write by environment variables; :func:`tracking_env` sets the ones the user has not
set, only for the run, and gives the environment (and MLflow's tracking URI) back as it was:
W&B runs offline in ``<output>/wandb`` (``wandb sync`` uploads it later), MLflow writes its file
store to ``<output>/mlruns`` (``mlflow ui --backend-store-uri <output>/mlruns`` shows it). Any of
these variables set beforehand (``WANDB_MODE=online``, an ``MLFLOW_TRACKING_URI`` server) wins.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, EnvironmentProblem

TRACKERS = ("tensorboard", "wandb", "mlflow")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def parse_report_to(value: str | None) -> list[str]:
    """``"tensorboard,wandb"`` -> the tracker names; ``"none"`` (or nothing) -> []."""
    names = [n.strip().lower() for n in (value or "none").split(",") if n.strip()]
    if names == ["none"] or not names:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"--report-to takes {', '.join(TRACKERS)} or none (several comma-separated), "
                          f"got {', '.join(unknown)}")
    return list(dict.fromkeys(names))


def check_trackers(names: list[str]) -> None:
    """EnvironmentProblem naming the extra to install when a tracker's package is missing (said
    before the model loads, not when the trainer starts)."""
    missing = [n for n in names if importlib.util.find_spec(_MODULES[n]) is None]
    if missing:
        raise EnvironmentProblem(f"--report-to {', '.join(missing)} needs its package: "
                                 f"pip install 'adaptune[tracking]' (or {' '.join(missing)})")


def _env_defaults(names: list[str], out: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    if "wandb" in names:
        env.update(WANDB_MODE="offline", WANDB_DIR=str(out.resolve()), WANDB_PROJECT="adaptune")
    if "mlflow" in names:
        # MLflow 3 keeps its file store but asks for this switch to use it
        env.update(MLFLOW_TRACKING_URI=(out / "mlruns").resolve().as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
    return env


def _close_runs(names: list[str], set_here: set[str]) -> None:
    """End what the integrations left open (so W&B's offline files are complete) and take back
    MLflow's process-wide tracking URI if it was ours."""
    if "wandb" in names and "wandb" in sys.modules:
        wandb = sys.modules["wandb"]
        if getattr(wandb, "run", None) is not None:
            wandb.finish()
    if "mlflow" in names and "mlflow" in sys.modules:
        mlflow = sys.modules["mlflow"]
        if mlflow.active_run() is not None:
            mlflow.end_run()
        if "MLFLOW_TRACKING_URI" in set_here:
            mlflow.set_tracking_uri(None)


@contextmanager
def tracking_env(names: list[str], out: str | os.PathLike) -> Iterator[dict[str, str]]:
    """Set the trackers' variables the user left unset for the duration of the run; yields them."""
    out = Path(out)
    before = dict(os.environ)
    set_here = {k: v for k, v in _env_defaults(names, out).items() if not os.environ.get(k)}
    if "wandb" in names:
        out.mkdir(parents=True, exist_ok=True)
    os.environ.update(set_here)
    try:
        yield set_here
    finally:
        try:
            _close_runs(names, set(set_here))
        finally:
            # set_tracking_uri writes MLFLOW_TRACKING_URI too: it is put back as it was
            for key in set(set_here) | ({"MLFLOW_TRACKING_URI"} if "mlflow" in names else set()):
                if key in before:
                    os.environ[key] = before[key]
                else:
                    os.environ.pop(key, None)
