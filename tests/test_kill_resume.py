"""SIGKILL ``adaptune train`` at random points; ``--resume`` must always finish, and the final
adapter must match an uninterrupted run (atol 1e-6).

Setup: a tiny local Llama and tokenizer saved to a folder, a small text file, deterministic
settings (``--dropout 0``, fixed ``--seed``, a checkpoint every step or two).

* The **reference** is one uninterrupted ``python -m adaptune.cli train`` in a subprocess.
* The **killed runs** are ``adaptune.cli.main(argv)`` in processes forked from a helper process
  (the "zygote") that imported adaptune, transformers and torch once: the same code path as the
  command after its imports, without paying ~5-15 s of imports for each of dozens of runs. Each
  is SIGKILLed by its pid and resumed with ``--resume`` until a run finishes; a separate test
  kills the real command during its imports.

Kill points come from a seeded RNG and are anchored to what the run is doing, so they land in
every phase whatever the machine's speed:

* ``loading``    - a random delay after the start (model, tokenizer and data loading, sample);
* ``training``   - a random delay after the k-th training step (random k) is logged;
* ``checkpoint`` - while transformers writes the j-th ``checkpoint-N`` folder of the run (the
                   folder is there, its ``trainer_state.json`` does not read whole yet);
* ``final``      - a random delay after training ended (perplexity, sample, adapter, card, plot).

After every kill the output folder is checked: each file under its final name reads whole, and
the checkpoint ``--resume`` would pick is complete. The figures (kills by phase, torn checkpoints
and temp files left, resumes, matches) are printed with ``-s``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import WORDS, make_tokenizer, tiny_llama

pytestmark = pytest.mark.skipif(os.name != "posix" or not hasattr(os, "fork"), reason="needs fork and SIGKILL")

WEIGHTS = "adapter_model.safetensors"
RUN_TIMEOUT = 300  # seconds for one run; a hang is a failure, not a stuck suite


def _env() -> dict[str, str]:
    # one thread per process: the same arithmetic in every run, a fork-safe OpenMP (no thread pool
    # exists before the fork), and the reference and the killed runs can share the cores
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("killresume")
    model = root / "model"
    tiny_llama().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    rng = random.Random(0)
    text = root / "words.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
                              for _ in range(200)), encoding="utf-8")
    # options the CLI has no flag for: a short sample, and a log line (progress marker) every step
    job = root / "job.yaml"
    job.write_text("sample_tokens: 2\nlogging_steps: 1\n", encoding="utf-8")
    return root


ZYGOTE = r"""
import json, os, sys, traceback
import adaptune.cli, adaptune.training.run, adaptune.training.trainer, adaptune.data, adaptune.hub  # noqa: F401
import adaptune.training.callbacks, adaptune.tools.evaluation, adaptune.tools.generation  # noqa: F401
out = os.fdopen(os.dup(1), "w", buffering=1)
for line in sys.stdin:
    req = json.loads(line)
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(log, 1); os.dup2(log, 2)
        sys.argv = ["adaptune"] + req["argv"]
        try:
            code = adaptune.cli.main(req["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    os.close(log)
    out.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
"""


class Zygote:
    """A Python process with adaptune imported that forks one ``cli.main`` run per request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_env())

    def start(self, argv: list[str], log: Path) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)["pid"]

    def exit_code(self) -> int:
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _argv(root: Path, out: Path, steps: int, save_every: int, resume: bool, extra: tuple[str, ...] = ()) -> list[str]:
    argv = ["train", "--config", str(root / "job.yaml"), "--model", str(root / "model"),
            "--data", str(root / "words.txt"), "--output", str(out), "--max-steps", str(steps),
            "--save-every", str(save_every), "--max-length", "32", "--batch-size", "4", "--lr", "0.01",
            "--dropout", "0", "--seed", "7", *extra]
    return argv + (["--resume"] if resume else [])


def _cli_subprocess(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adaptune.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())


# ---- one killed-or-finished run ------------------------------------------------------------------
class Run:
    """One ``cli.main`` run forked by the zygote; its output log is followed by a thread."""

    def __init__(self, zygote: Zygote, argv: list[str], log: Path):
        self.zygote, self.log = zygote, log
        self.started = time.monotonic()
        self.pid = zygote.start(argv, log)
        self.rc: int | None = None
        self.lines: list[str] = []
        self.steps_logged = 0
        self.trained = threading.Event()  # the 'training done' line is out: training ended
        self._done = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.rc = self.zygote.exit_code()
        self._done.set()

    def _follow(self) -> None:
        pos, tail = 0, ""
        while True:
            done = self._done.is_set()
            with open(self.log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            parts = (tail + chunk.decode("utf-8", "replace")).replace("\r", "\n").split("\n")
            tail = parts.pop()
            for line in parts:
                self.lines.append(line)
                if line.startswith("step ") and "  loss " in line:
                    self.steps_logged += 1
                elif line.startswith("training done:"):
                    self.trained.set()
            if done:
                return
            time.sleep(0.002)

    def running(self) -> bool:
        return not self._done.is_set()

    def kill(self) -> bool:
        """SIGKILL the run (by its pid). False if it had already exited."""
        if not self.running():
            return False
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._done.wait(30)
        return self.rc == -signal.SIGKILL

    def wait(self) -> int:
        if not self._done.wait(RUN_TIMEOUT):
            self.kill()
            raise AssertionError("run timed out:\n" + self.output())
        return self.rc

    def phase(self) -> str:
        if self.trained.is_set():
            return "final eval/save"
        if self.steps_logged or any(line.startswith("validation perplexity before") for line in self.lines):
            return "training"
        return "model/data loading"

    def output(self) -> str:
        return "\n".join(self.lines[-40:])


def _sleep_while_running(run: Run, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while run.running() and time.monotonic() < end:
        time.sleep(min(0.002, max(end - time.monotonic(), 0)))
    return run.running()


def _wait_until(run: Run, condition) -> bool:
    while run.running() and not condition():
        if time.monotonic() - run.started > RUN_TIMEOUT:
            raise AssertionError("run never reached the expected point:\n" + run.output())
        time.sleep(0.002)
    return run.running()


def _checkpoint_complete(folder: Path) -> bool:
    try:
        json.loads((folder / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def _checkpoints(out: Path) -> dict[int, Path]:
    found = {}
    if out.is_dir():
        for child in out.iterdir():
            prefix, _, number = child.name.partition("-")
            if prefix == "checkpoint" and number.isdigit() and child.is_dir():
                found[int(number)] = child
    return found


def _wait_for_checkpoint_write(run: Run, out: Path, nth: int) -> bool:
    """Return once the run is writing its ``nth`` checkpoint (folder there, state not yet whole).

    A torn folder an earlier kill left counts only once this run writes into it (its mtime moves).
    """
    if not _wait_until(run, lambda: run.phase() != "model/data loading"):  # after the start-up clean-up
        return False
    done = {n for n, p in _checkpoints(out).items() if _checkpoint_complete(p)}
    stale = {n: p.stat().st_mtime_ns for n, p in _checkpoints(out).items() if n not in done}
    writes = 0
    while run.running():
        for n, folder in sorted(_checkpoints(out).items()):
            if n in done:
                continue
            if _checkpoint_complete(folder):
                done.add(n)
                writes += 1
                continue
            try:
                if n in stale and folder.stat().st_mtime_ns == stale[n]:
                    continue
            except OSError:  # deleted meanwhile (rotation)
                continue
            if writes + 1 >= nth:
                return run.running()
        time.sleep(0.0005)
    return False


# ---- checks on a killed folder -------------------------------------------------------------------
def _torn(out: Path) -> dict[int, int]:
    """Torn checkpoint folders: number -> mtime."""
    found = {}
    for n, folder in _checkpoints(out).items():
        try:
            if not _checkpoint_complete(folder):
                found[n] = folder.stat().st_mtime_ns
        except OSError:
            pass
    return found


def _temps(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob(".*.tmp-*")) if out.is_dir() else []


def _check_files_whole(out: Path, torn_before: dict[int, int], temps_before: list[str]) -> list[str]:
    """Every file under its final name reads whole; returns notes on what the kill left behind
    (a torn checkpoint counts if this run tore it: new, or written into since the run started)."""
    from adaptune.atomic import read_jsonl
    from adaptune.training.checkpoints import last_complete_checkpoint

    notes = []
    if (out / WEIGHTS).exists():
        load_file(out / WEIGHTS)
    for name in ("adapter_config.json", "train_result.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())
    if (out / "metrics.jsonl").exists():
        read_jsonl(out / "metrics.jsonl")
    if (out / "loss.png").exists():
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for n, folder in sorted(_checkpoints(out).items()):
        if not _checkpoint_complete(folder):
            if torn_before.get(n) != folder.stat().st_mtime_ns:
                notes.append(f"checkpoint-{n} torn")
        elif not (folder / WEIGHTS).exists():  # killed while transformers deleted an old checkpoint
            notes.append(f"checkpoint-{n} half-deleted by rotation")
    # the checkpoint --resume picks reads back whole
    picked = last_complete_checkpoint(out, say=lambda line: None)
    if picked is not None:
        picked = Path(picked)
        load_file(picked / WEIGHTS)
        json.loads((picked / "adapter_config.json").read_text())
        torch.load(picked / "optimizer.pt", weights_only=True)
    last = last_complete_checkpoint(out)
    assert last is None or _checkpoint_complete(Path(last))
    temps = sorted(set(_temps(out)) - set(temps_before))
    if temps:
        notes.append(f"temp file left: {', '.join(temps)}")
    return notes


def _last_step(out: Path) -> int:
    return max((n for n, p in _checkpoints(out).items() if _checkpoint_complete(p)), default=0)


def _compare(reference: Path, out: Path) -> None:
    a, b = load_file(reference / WEIGHTS), load_file(out / WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{out}: {key}: {m}")


# ---- campaigns -----------------------------------------------------------------------------------
@dataclass
class Stats:
    kills: list[dict] = field(default_factory=list)
    resumes: int = 0
    finished_before_kill: int = 0
    campaigns: int = 0
    matched: int = 0

    def summary(self) -> str:
        phases = Counter(k["phase"] for k in self.kills)
        anchors = Counter(k["anchor"] for k in self.kills)
        torn = sum(1 for k in self.kills if any("torn" in n for n in k["notes"]))
        temps = sum(1 for k in self.kills if any("temp" in n for n in k["notes"]))
        return (f"{len(self.kills)} kills (anchors {dict(anchors)}; phases {dict(phases)}); {torn} left a torn "
                f"checkpoint, {temps} left a temp file; {self.resumes} resumes; {self.finished_before_kill} runs "
                f"finished before their kill point; {self.campaigns} runs to completion, {self.matched} final "
                f"adapters matched the uninterrupted run")


def _kill_at(run: Run, out: Path, anchor: str, steps: int, rng: random.Random) -> bool:
    """Wait for ``anchor`` plus a random delay, then SIGKILL. False: the run finished first."""
    if anchor == "loading":
        alive = _sleep_while_running(run, rng.uniform(0.0, 1.0))
    elif anchor == "training":
        k, delay = rng.randint(1, steps), rng.uniform(0.0, 0.2)
        alive = _wait_until(run, lambda: run.steps_logged >= k or run.trained.is_set()) \
            and _sleep_while_running(run, delay)
    elif anchor == "checkpoint":
        nth, delay = rng.randint(1, 3), rng.uniform(0.0, 0.004)
        alive = _wait_for_checkpoint_write(run, out, nth) and _sleep_while_running(run, delay)
    elif anchor == "final":
        alive = _wait_until(run, run.trained.is_set) and _sleep_while_running(run, rng.uniform(0.0, 1.0))
    else:
        raise AssertionError(anchor)
    return alive and run.kill()


def run_kill_campaigns(root: Path, zygote: Zygote, plan: list[str], steps: int, save_every: int,
                       seed: int, extra: tuple[str, ...] = ()) -> Stats:
    """Kill at the points in ``plan`` (in order), resuming after each kill until a run finishes;
    start another output folder while kills are left. Every finished adapter must match.
    ``extra``: more flags for every run (the reference's too)."""
    rng = random.Random(seed)
    stats = Stats()
    reference = root / f"reference-{steps}-{save_every}{'-'.join(('', *extra)).replace('--', '')}"
    ref = None
    if not (reference / WEIGHTS).exists():
        ref = _cli_subprocess(_argv(root, reference, steps, save_every, resume=False, extra=extra))  # alongside
    plan = list(plan)
    try:
        while plan:
            stats.campaigns += 1
            out = root / f"killed-{seed}-{stats.campaigns}"
            attempt = 0
            while True:
                anchor = plan[0] if plan else None
                step_before, torn_before, temps_before = _last_step(out), _torn(out), _temps(out)
                run = Run(zygote, _argv(root, out, steps, save_every, resume=attempt > 0, extra=extra),
                          root / f"log-{seed}-{stats.campaigns}-{attempt}.txt")
                if anchor is not None and _kill_at(run, out, anchor, steps, rng):
                    plan.pop(0)
                    notes = _check_files_whole(out, torn_before, temps_before)
                    phase = run.phase()
                    if phase == "training" and any("torn" in n for n in notes):
                        phase = "checkpoint write"
                    elif phase == "training" and any("rotation" in n for n in notes):
                        phase = "checkpoint rotation"
                    at_s = round(time.monotonic() - run.started, 2)
                    stats.kills.append({"anchor": anchor, "phase": phase, "at_s": at_s,
                                        "checkpoint": f"{step_before}->{_last_step(out)}", "notes": notes})
                    attempt += 1
                    stats.resumes += 1
                    continue
                rc = run.wait()
                assert rc == 0, f"run {attempt} in {out} exited with {rc}:\n{run.output()}"
                stats.finished_before_kill += anchor is not None
                break
            if ref is not None:
                text, _ = ref.communicate(timeout=RUN_TIMEOUT)
                assert ref.returncode == 0, text[-3000:]
                ref = None
            _compare(reference, out)
            stats.matched += 1
            leftovers = _temps(out)
            assert not leftovers, f"temporary files left after the run finished: {leftovers}"
    finally:
        if ref is not None and ref.poll() is None:
            ref.kill()
            ref.wait()
    return stats


def _report(label: str, stats: Stats, seconds: float, capsys) -> None:
    with capsys.disabled():
        print(f"\n[{label}] {stats.summary()}; {seconds:.0f} s")
        for k in stats.kills:
            print(f"  {k}")


# ---- tests ---------------------------------------------------------------------------------------
def test_five_kills_and_resumes_give_the_uninterrupted_adapter(workdir, zygote, capsys):
    started = time.monotonic()
    stats = run_kill_campaigns(workdir, zygote, ["checkpoint", "training", "checkpoint", "final", "loading"],
                               steps=10, save_every=1, seed=1)
    _report("kill/resume", stats, time.monotonic() - started, capsys)
    assert len(stats.kills) == 5 and stats.matched == stats.campaigns >= 1
    assert any("torn" in n for k in stats.kills for n in k["notes"]), "no kill landed in a checkpoint write"


def test_streamed_run_killed_and_resumed_gives_the_uninterrupted_adapter(workdir, zygote, capsys):
    """--streaming: each resume goes on at the stream position saved with its checkpoint."""
    started = time.monotonic()
    stats = run_kill_campaigns(workdir, zygote, ["checkpoint", "training"], steps=8, save_every=2,
                               seed=3, extra=("--streaming", "--stream-window", "40"))
    _report("kill/resume streamed", stats, time.monotonic() - started, capsys)
    assert len(stats.kills) == 2 and stats.matched == stats.campaigns >= 1


def test_kill_of_the_real_command_during_imports_then_resume(workdir, tmp_path):
    """The command itself (not a fork), killed while it imports, then run with --resume."""
    out = tmp_path / "out"
    proc = _cli_subprocess(_argv(workdir, out, 4, 2, resume=False))
    time.sleep(random.Random(5).uniform(0.5, 2.0))
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / WEIGHTS).exists()
    proc = _cli_subprocess(_argv(workdir, out, 4, 2, resume=True))
    text, _ = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, text[-3000:]
    assert "no complete checkpoint" in text
    load_file(out / WEIGHTS)


@pytest.mark.slow
def test_thirty_kills_and_resumes_give_the_uninterrupted_adapter(workdir, zygote, capsys):
    started = time.monotonic()
    plan = random.Random(30).choices(["loading", "training", "checkpoint", "final"], weights=[1, 4, 3, 2], k=30)
    stats = run_kill_campaigns(workdir, zygote, plan, steps=16, save_every=2, seed=30)
    _report("kill/resume slow", stats, time.monotonic() - started, capsys)
    assert len(stats.kills) == 30 and stats.matched == stats.campaigns >= 1
