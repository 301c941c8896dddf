"""Adapters by name: loaded at start, on first use from ``--adapter-dir``, or at runtime.

A name maps to an :class:`Entry`. Loading under a taken name makes a new entry under a new
internal key; the old one stays in the model until the requests that hold it finish (a
:class:`Lease` per request), so a replacement is atomic for every request. ``max_loras`` caps
the LoRA adapters resident in the model: the least recently used one that no request holds is
unloaded first, and loaded again from its folder when asked for.

Every change of the model happens under the engine's lock, between two of its steps. Names and
reference counts have a lock of their own, so that a request for a loaded adapter never waits for
a step to end.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from torch import nn

from ..errors import AdapterFileError, AdaptuneError, ConfigError
from .adapters import AdapterFiles, LoraHost, PromptAdapter, read_adapter

MAX_NAME = 200


class UnknownModel(AdaptuneError, LookupError):
    """No base model or adapter goes by this name (HTTP 404)."""


def check_name(name: str) -> str:
    """An adapter name is a name: no path separators, no ``..``, not absolute, printable."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("the adapter name is empty")
    if len(name) > MAX_NAME:
        raise ConfigError(f"the adapter name is longer than {MAX_NAME} characters")
    if ".." in name or "/" in name or "\\" in name or PurePosixPath(name).is_absolute() \
            or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise ConfigError(f"adapter name {name!r} is refused: a name may not hold '..', a path separator or "
                          f"an absolute path")
    if any(not ch.isprintable() for ch in name):
        raise ConfigError("the adapter name holds control characters")
    return name


@dataclass(eq=False)
class Entry:
    name: str
    path: Path
    kind: str  # "lora" | "prompt"
    created: int
    key: str | None = None  # internal LoRA key while resident
    prompt: PromptAdapter | None = None
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retired: bool = False  # replaced or unloaded; deleted from the model when refs reaches 0


@dataclass(frozen=True)
class Lease:
    """What one request uses: its LoRA terms ((internal key, scale), ...) and any prompt adapter."""

    entries: tuple[Entry, ...]
    terms: tuple[tuple[str, float], ...]
    prompt: PromptAdapter | None
    label: str  # for metrics and logs: "base", "name", or "a*0.5+b"


class Registry:
    def __init__(self, model: nn.Module, lock: threading.RLock, max_loras: int | None = None,
                 adapter_dir: str | Path | None = None) -> None:
        self.model = model
        self.host = LoraHost(model)
        self.lock = lock  # the engine's: the model changes only between steps
        self._meta = threading.Lock()  # names, keys and reference counts; taken after ``lock``, never before
        self.max_loras = max_loras
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self._entries: dict[str, Entry] = {}
        self._retired: list[Entry] = []
        self._keys = itertools.count(1)

    # ---- names ------------------------------------------------------------------------------
    def names(self) -> list[Entry]:
        with self._meta:
            return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def resident_loras(self) -> list[str]:
        with self._meta:
            return [e.name for e in self._entries.values() if e.key is not None]

    # ---- loading ----------------------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> Entry:
        """Load (or replace) adapter ``name`` from folder ``path``; requests in flight keep the old one."""
        check_name(name)
        files = read_adapter(Path(path).expanduser(), self.model)  # outside the lock: disk and checks
        with self.lock, self._meta:
            entry = Entry(name, files.path, files.kind, int(time.time()))
            self._make_resident(entry, files)
            old = self._entries.get(name)
            self._entries[name] = entry
            if old is not None:
                self._retire(old)
            self._evict()
            return entry

    def unload(self, name: str) -> None:
        with self.lock, self._meta:
            entry = self._entries.pop(name, None)
            if entry is None:
                raise UnknownModel(f"no adapter named {name!r} is loaded")
            self._retire(entry)

    def _make_resident(self, entry: Entry, files: AdapterFiles) -> None:
        if files.kind == "prompt":
            entry.prompt = files.prompt
            return
        key = f"lora{next(self._keys)}"
        self.host.add(key, files)
        entry.key = key

    def _resolve(self, name: str) -> Entry:
        """The entry for ``name``, loading it from ``--adapter-dir`` on first use."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        check_name(name)
        if self.adapter_dir is None:
            raise UnknownModel(f"the model {name!r} does not exist")
        path = (self.adapter_dir / name).resolve()
        if path.parent != self.adapter_dir or not path.is_dir():  # a link out of the folder counts as absent
            raise UnknownModel(f"the model {name!r} does not exist")
        return self.load(name, path)

    # ---- leases -----------------------------------------------------------------------------
    def lease(self, terms: list[tuple[str, float]]) -> Lease:
        """Hold the named adapters for one request (loading any that are not resident)."""
        with self._meta:
            entries = [self._entries.get(name) for name, _ in terms]
            if all(e is not None and (e.kind == "prompt" or e.key is not None) for e in entries):
                return self._take(terms, entries)
        with self.lock:  # between engine steps: load from --adapter-dir, or again after an eviction
            entries = [self._resolve(name) for name, _ in terms]
            with self._meta:
                for entry in entries:
                    if entry.kind == "lora" and entry.key is None:
                        self._reload(entry)
                return self._take(terms, entries)

    def _take(self, terms: list[tuple[str, float]], entries: list[Entry]) -> Lease:
        prompts = [e for e in entries if e.kind == "prompt"]
        if len(prompts) > 1 or any(scale != 1 for (_, scale), e in zip(terms, entries) if e.kind == "prompt"):
            raise ConfigError("a request may use one prompt-learning adapter, at scale 1")
        if len({e.name for e in entries}) != len(entries):
            raise ConfigError("an adapter is named twice in one request")
        now = time.monotonic()
        for entry in entries:
            entry.refs += 1
            entry.last_used = now
        lora = tuple(sorted((e.key, float(s)) for (_, s), e in zip(terms, entries) if e.kind == "lora"))
        label = "+".join(n if s == 1 else f"{n}*{s:g}" for n, s in terms) or "base"
        return Lease(tuple(entries), lora, prompts[0].prompt if prompts else None, label)

    def release(self, lease: Lease) -> None:
        with self.lock, self._meta:
            now = time.monotonic()
            for entry in lease.entries:
                entry.refs -= 1
                entry.last_used = now
            self._collect()
            self._evict()

    def _reload(self, entry: Entry) -> None:
        try:
            files = read_adapter(entry.path, self.model)
        except AdapterFileError as exc:
            raise AdapterFileError(f"adapter {entry.name!r} was unloaded to make room and cannot be read "
                                   f"again: {exc}") from None
        self._make_resident(entry, files)
        self._evict(keep=entry)

    def _retire(self, entry: Entry) -> None:
        entry.retired = True
        self._retired.append(entry)
        self._collect()

    def _collect(self) -> None:
        for entry in [e for e in self._retired if e.refs == 0]:
            if entry.key is not None:
                self.host.remove(entry.key)
                entry.key = None
            self._retired.remove(entry)

    def _evict(self, keep: Entry | None = None) -> None:
        """Unload idle LoRA adapters, least recently used first, down to ``max_loras``."""
        if self.max_loras is None:
            return
        resident = [e for e in self._entries.values() if e.key is not None]
        excess = len(resident) - self.max_loras
        for entry in sorted((e for e in resident if e.refs == 0 and e is not keep), key=lambda e: e.last_used):
            if excess <= 0:
                break
            self.host.remove(entry.key)
            entry.key = None
            excess -= 1
