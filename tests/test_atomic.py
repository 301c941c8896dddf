"""adaptune.atomic: files and folders appear whole or not at all; a bad output dir fails early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from adaptune import atomic
from adaptune.atomic import (
    append_jsonl,
    atomic_directory,
    atomic_path,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    read_jsonl,
)
from adaptune.errors import DataError, EnvironmentProblem


def _names(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_write_bytes_text_json_content_and_no_leftovers(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01\xff")
    atomic_write_text(tmp_path / "b.txt", "héllo\r\nworld")
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1.5, "x"]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01\xff"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\r\nworld".encode()
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"a": [1.5, "x"], "b": 1}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")  # sort_keys, indent=2
    assert '\n  "a"' in text
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.json"]


def test_overwrite_replaces_and_creates_parent(tmp_path):
    target = tmp_path / "deep" / "er" / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _names(target.parent) == ["f.txt"]


def test_file_mode_follows_umask_not_mkstemp(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_exception_mid_write_leaves_old_file(tmp_path):
    target = tmp_path / "adapter_config.json"
    atomic_write_json(target, {"r": 8})
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text('{"r": 1')  # half a file
        raise RuntimeError("boom")
    assert target.read_bytes() == before
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert target.read_bytes() == before
    assert _names(tmp_path) == ["adapter_config.json"]


def test_failed_rename_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["f.bin"]


def test_atomic_path_keeps_extension_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "loss.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"\x89PNG")
    assert (tmp_path / "loss.png").read_bytes() == b"\x89PNG"
    assert _names(tmp_path) == ["loss.png"]


def test_safetensors_roundtrip_with_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / "adapter_model.safetensors"
    atomic_save_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = load_file(path)
    assert set(loaded) == {"w", "b"}
    assert torch.equal(loaded["w"], tensors["w"]) and loaded["b"].dtype == torch.bfloat16
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert _names(tmp_path) == ["adapter_model.safetensors"]


def test_atomic_directory_new_and_replace(tmp_path):
    dest = tmp_path / "merged"
    with atomic_directory(dest) as d:
        assert not dest.exists()
        (d / "config.json").write_text("{}")
        (d / "sub").mkdir()
        (d / "sub" / "x.txt").write_text("x")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["config.json", "sub", "sub/x.txt"]
    with atomic_directory(dest) as d:
        (d / "model.safetensors").write_bytes(b"new")
        assert (dest / "config.json").exists()  # the old folder is whole until the swap
    assert _names(dest) == ["model.safetensors"]
    assert _names(tmp_path) == ["merged"]


def test_atomic_directory_exception_keeps_old_folder(tmp_path):
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "adapter_model.safetensors").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(dest) as d:
        (d / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert (dest / "adapter_model.safetensors").read_bytes() == b"old"
    assert _names(tmp_path) == ["adapter"]


_KILL_CHILD = r"""
import sys
from adaptune.atomic import atomic_write_bytes
path = sys.argv[1]
blocks = [b"A" * 1_000_000, b"B" * 1_000_000]
i = 0
while True:
    atomic_write_bytes(path, blocks[i % 2])
    i += 1
    if i == 1:
        print("ready", flush=True)
"""


def test_sigkill_during_rewrites_leaves_old_or_new(tmp_path):
    target = tmp_path / "blob.bin"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(atomic.__file__).parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(target)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    data = target.read_bytes()
    assert data in (b"A" * 1_000_000, b"B" * 1_000_000)
    # A kill may leave a dot-named temporary file behind, never anything under the real name.
    assert all(n == "blob.bin" or n.startswith(".blob.tmp-") for n in _names(tmp_path))


def test_jsonl_append_and_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 2.5})
    append_jsonl(path, {"step": 2, "loss": float("nan")})
    records = read_jsonl(path)
    assert records[0] == {"step": 1, "loss": 2.5}
    assert records[1]["step"] == 2 and records[1]["loss"] != records[1]["loss"]
    assert path.read_text().count("\n") == 2


def test_jsonl_torn_last_line_skipped_then_repaired_on_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "ab") as f:
        f.write(b'{"step": 2, "lo')  # killed mid-append
    assert read_jsonl(path) == [{"step": 1}]
    append_jsonl(path, {"step": 3})
    assert read_jsonl(path) == [{"step": 1}, {"step": 3}]
    assert path.read_bytes() == b'{"step": 1}\n{"step": 3}\n'


def test_jsonl_torn_only_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"st')
    assert read_jsonl(path) == []
    append_jsonl(path, {"a": 1})
    assert read_jsonl(path) == [{"a": 1}]


def test_jsonl_corrupt_middle_line_is_a_clear_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(path)


def test_check_writable_creates_directory(tmp_path):
    d = check_writable(tmp_path / "runs" / "one", need_bytes=1)
    assert d.is_dir() and os.listdir(d) == []


def test_check_writable_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EnvironmentProblem, match="cannot create output directory"):
        check_writable(tmp_path / "file" / "out")
    with pytest.raises(EnvironmentProblem, match="not a directory"):
        check_writable(tmp_path / "file")


def test_check_writable_read_only_directory(tmp_path, monkeypatch):
    # Tests run as root, for whom chmod does not make a directory read-only: make the probe fail
    # the way a read-only mount does.
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(EnvironmentProblem, match="not writable: Read-only file system"):
        check_writable(tmp_path)


def test_check_writable_disk_full(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    check_writable(tmp_path, need_bytes=1 << 20)
    with pytest.raises(EnvironmentProblem, match=r"only 5\.0 MiB free .* about 2\.0 GiB is needed"):
        check_writable(tmp_path, need_bytes=2 << 30)
