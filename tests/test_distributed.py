"""Training under torchrun (DDP, gloo on CPU): the same run as one process with the same global batch."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import WORDS, make_tokenizer, tiny_llama

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


def _run(cmd: list[str], cwd, extra_env: dict[str, str] | None = None) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _losses(folder) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_two_process_ddp_matches_one_process_with_same_global_batch(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    data = tmp_path / "data.txt"
    data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(200)))
    common = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "6", "--max-length", "32",
              "--dropout", "0", "--logging-steps", "1", "--lr", "0.01", "--save-every", "100"]
    _run([sys.executable, "-m", "adaptune.cli", *common, "--batch-size", "4", "--output", str(tmp_path / "one")],
         tmp_path)
    _run(["torchrun", "--nproc_per_node", "2", "-m", "adaptune.cli", *common, "--batch-size", "2",
          "--output", str(tmp_path / "two")], tmp_path)

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two] == [1, 2, 3, 4, 5, 6], "each step logged once (by rank 0 only)"
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-3)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    leftovers = [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("fails", [False, True])
def test_train_command_ends_the_process_group_it_ran_under(monkeypatch, tmp_path, fails):
    """Left to interpreter exit, gloo's threads sometimes abort a finished torchrun process (SIGABRT).
    A failed run leaves the group alone: its peers may be inside a collective it would wait on."""
    import argparse

    import torch.distributed as dist

    from adaptune.cli import train as cli
    from adaptune.training import run as recipe

    def run_train(job):
        if fails:
            raise RuntimeError("training failed")
        return {}

    monkeypatch.setattr(recipe, "run_train", run_train)
    monkeypatch.setattr(cli, "job_from_args", lambda args: None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="training failed"):
                cli.cmd_train(argparse.Namespace())
            assert dist.is_initialized()
        else:
            assert cli.cmd_train(argparse.Namespace()) == 0
            assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp2_sharded_lora_trains_and_saves_as_one_process(tmp_path):
    """FSDP2 (``fully_shard``, gloo) over 2 processes: each holds half of every weight. The run
    matches one process on the whole batch, and the adapter saved from the gathered full state
    dict equals its adapter (what transformers' Trainer does with FSDP's full state dict)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _run([sys.executable, "-m", "tests.fsdp2_worker", str(tmp_path / "one")], tmp_path, env)
    _run(["torchrun", "--nproc_per_node", "2", "-m", "tests.fsdp2_worker", str(tmp_path / "two")], tmp_path, env)

    one = json.loads((tmp_path / "one" / "run.json").read_text())
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert one["chunked_loss_before"] and two["chunked_loss_before"]
    assert one["chunked_loss_after"] and not two["chunked_loss_after"], "no chunked loss around FSDP2's hooks"
    assert "sharded" in two["save_from_shards"] and "get_model_state_dict" in two["save_from_shards"]
    assert not (tmp_path / "two" / "from-shards" / "adapter_model.safetensors").exists()
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
