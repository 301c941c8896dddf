"""``adaptune serve`` on the command line: flags, defaults (127.0.0.1), refusals, and one real start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from adaptune.cli import build_parser, main  # noqa: E402
from tests.serve_helpers import free_port_socket  # noqa: E402
from tests.tiny import nonzero_lora_b, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    from adaptune import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapter")
    nonzero_lora_b(get_peft_model(tiny_llama(), LoraConfig(r=2, init_lora_weights=False))).save_pretrained(folder)
    return folder


def test_defaults_bind_this_machine_only() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.model is None
    assert not args.allow_runtime_loading and args.api_key is None and args.max_batch == 16


def test_serve_passes_its_options_to_uvicorn(monkeypatch, model_dir, adapter) -> None:
    seen = {}

    def fake_run(app, **kwargs):
        seen.update(kwargs, app=app)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--model", str(model_dir), "--adapter", f"shakespeare={adapter}", "--port", "8123",
                 "--max-loras", "3"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    state = seen["app"].state.serve
    assert [e.name for e in state.registry.names()] == ["shakespeare"]
    assert state.registry.max_loras == 3 and not state.allow_runtime_loading and state.api_key is None


@pytest.mark.parametrize("argv, words", [
    (["--adapter", "noequals"], "NAME=DIR"),
    (["--adapter", "../x=/tmp"], "path"),
    (["--adapter", "a=/no/such/folder"], "no such adapter folder"),
    (["--max-batch", "0"], "positive integer"),
    (["--adapter-dir", "/no/such/folder"], "no such folder"),
])
def test_bad_flags_are_one_line_errors(monkeypatch, capsys, model_dir, argv, words) -> None:
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not start"))
    try:
        code = main(["serve", "--model", str(model_dir), *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


@pytest.mark.slow
def test_the_command_serves_on_127_0_0_1(model_dir, adapter) -> None:
    import httpx

    sock = free_port_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adaptune", "serve", "--model", str(model_dir), "--adapter",
                             f"shakespeare={adapter}", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [str(model_dir), "shakespeare"]
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                         json={"model": "shakespeare", "prompt": "the king", "max_tokens": 3}).json()
        assert out["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(30)
