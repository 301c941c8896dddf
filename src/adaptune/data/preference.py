"""Preference data -> token rows: pairs ``{prompt, chosen, rejected}`` and KTO rows ``{prompt, completion, label}``.

Each field is a string, or (conversational) a list of ``{role, content}`` messages rendered with the
tokenizer's chat template. Tokenized as TRL tokenizes them, so the same file gives the same tokens
in both: ``prompt_ids = tok(prompt)``, ``prompt + answer`` tokenized whole (plain text gets EOS
appended as text, as TRL does), and the answer is what follows the longest common prefix of the two
(a token that merges across the boundary, or a template that renders the prompt alone differently,
moves the boundary, never drops a token of the answer). Sequences longer than ``max_length`` keep
their start; a row whose prompt alone fills ``max_length`` has nothing left to learn and is
skipped. Bad rows are counted by reason, with line numbers, in a ``DataReport`` (as for SFT data).

Rows come from anywhere SFT data does (``data.sources``): a JSON / JSON-lines file, csv, parquet,
arrow, a ``save_to_disk`` folder or a hub dataset id, with ``columns`` renaming the data's names
onto these. A pairs file trains KTO too: each pair becomes a desirable and an undesirable row (TRL's
``unpair_preference_dataset``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from .chat import common_prefix_len, is_unicode
from .formats import as_source, read_rows
from .records import IGNORE_INDEX, BadRow, DataReport
from .sources import TEXT, DataSource

KINDS = ("pairs", "kto")
DETECT_ROWS = 100


@dataclass
class PairFeature:
    """One preference pair as token ids: the prompt and the two answers that follow it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def as_dict(self) -> dict[str, list[int]]:
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}


@dataclass
class KTOFeature:
    """One unpaired example: a prompt, an answer and whether the answer is desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "completion_ids": self.completion_ids, "label": self.label}


# --------------------------------------------------------------------------- fields


def _text_or_messages(row: dict, name: str) -> str | list[dict]:
    """A field that is a non-empty string or a list of chat messages; BadRow otherwise."""
    if name not in row or row[name] is None:
        raise BadRow(f"missing '{name}'")
    value = row[name]
    if isinstance(value, str):
        if not is_unicode(value):
            raise BadRow(f"'{name}' holds a lone surrogate escape (\\ud800-\\udfff), not text")
        if name != "prompt" and not value.strip():
            raise BadRow(f"empty '{name}'")
        return value
    if isinstance(value, list) and value:
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadRow(f"a message of '{name}' is not {{role: str, content: str}}")
            if not (is_unicode(m["role"]) and is_unicode(m["content"])):
                raise BadRow(f"a message of '{name}' holds a lone surrogate escape, not text")
        return value
    raise BadRow(f"'{name}' is not a string or a non-empty list of messages")


def _split_implicit_prompt(row: dict) -> dict:
    """Conversational pairs without 'prompt': the messages chosen and rejected share are the prompt."""
    if "prompt" in row or not isinstance(row.get("chosen"), list) or not isinstance(row.get("rejected"), list):
        return row
    chosen, rejected = row["chosen"], row["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


# --------------------------------------------------------------------------- tokenizing


def _ids(tokenizer: Any, value: str | list[dict], generation_prompt: bool = False) -> list[int]:
    if isinstance(value, str):
        return list(tokenizer(value, verbose=False)["input_ids"])
    try:
        out = tokenizer.apply_chat_template(value, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=True)
    except Exception as err:  # jinja raises whatever the template author chose
        raise BadRow(f"chat template error ({type(err).__name__})") from None
    return list(out["input_ids"])


def _join(prompt: str | list[dict], answer: str | list[dict], eos: str | None) -> str | list[dict]:
    if isinstance(prompt, str) != isinstance(answer, str):
        raise BadRow("prompt and answer mix a string and a message list")
    if isinstance(answer, str):
        return prompt + (answer if eos is None or answer.endswith(eos) else answer + eos)
    return prompt + answer


def tokenize_answers(tokenizer: Any, prompt: str | list[dict], answers: list[str | list[dict]],
                     ) -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [answer_ids, ...])`` as TRL tokenizes them (module docstring)."""
    prompt_ids = _ids(tokenizer, prompt, generation_prompt=True)
    eos = getattr(tokenizer, "eos_token", None)
    full = [_ids(tokenizer, _join(prompt, a, eos)) for a in answers]
    cut = min(common_prefix_len(prompt_ids, ids) for ids in full)
    return prompt_ids[:cut], [ids[cut:] for ids in full]


def _fit(prompt: list[int], answer: list[int], max_length: int | None) -> tuple[list[int], bool]:
    """The answer cut so that prompt + answer fits (keeping the start), and whether it was cut."""
    if max_length is None or len(prompt) + len(answer) <= max_length:
        return answer, False
    if len(prompt) >= max_length:
        raise BadRow(f"prompt fills max_length {max_length}")
    return answer[:max_length - len(prompt)], True


def pair_feature(row: dict, tokenizer: Any, max_length: int | None = None) -> tuple[PairFeature, bool]:
    """One pairs row -> (PairFeature, truncated); raises BadRow saying what is wrong with it."""
    row = _split_implicit_prompt(row)
    prompt = _text_or_messages(row, "prompt")
    chosen, rejected = _text_or_messages(row, "chosen"), _text_or_messages(row, "rejected")
    if chosen == rejected:
        raise BadRow("chosen and rejected are the same")
    prompt_ids, (chosen_ids, rejected_ids) = tokenize_answers(tokenizer, prompt, [chosen, rejected])
    if not chosen_ids or not rejected_ids:
        raise BadRow("an answer has no tokens after the prompt")
    chosen_ids, cut_c = _fit(prompt_ids, chosen_ids, max_length)
    rejected_ids, cut_r = _fit(prompt_ids, rejected_ids, max_length)
    return PairFeature(prompt_ids, chosen_ids, rejected_ids), cut_c or cut_r


def kto_feature(row: dict, tokenizer: Any, max_length: int | None = None) -> tuple[KTOFeature, bool]:
    """One KTO row -> (KTOFeature, truncated); raises BadRow."""
    prompt = _text_or_messages(row, "prompt")
    completion = _text_or_messages(row, "completion")
    label = row.get("label")
    if not isinstance(label, bool):
        raise BadRow("'label' is not true or false" if "label" in row else "missing 'label'")
    prompt_ids, (completion_ids,) = tokenize_answers(tokenizer, prompt, [completion])
    if not completion_ids:
        raise BadRow("the completion has no tokens after the prompt")
    completion_ids, cut = _fit(prompt_ids, completion_ids, max_length)
    return KTOFeature(prompt_ids, completion_ids, label), cut


# --------------------------------------------------------------------------- files


def _row_kind(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if "chosen" in row and "rejected" in row:
        return "pairs"
    if "completion" in row and "label" in row:
        return "kto"
    return None


def detect_kind(path: str | Path, rows: list[tuple[int, Any]]) -> str:
    """'pairs' or 'kto', by the keys of most of the first object rows; DataError if neither."""
    objects = [row for _, row in rows if isinstance(row, dict)][:DETECT_ROWS]
    kinds = [k for k in map(_row_kind, objects) if k is not None]
    if not kinds:
        keys = sorted({k for row in objects for k in row})[:10]
        found = f"found keys {keys}" if objects else "found no JSON objects"
        raise DataError(f"{path}: not preference data ({found}); rows need 'prompt', 'chosen' and 'rejected' "
                        "(pairs) or 'prompt', 'completion' and 'label' (KTO)")
    return max(KINDS, key=kinds.count)


def _unpaired(row: Any) -> list[Any]:
    """A pair as two KTO rows (chosen: desirable, rejected: undesirable); anything else as it is."""
    if _row_kind(row) != "pairs":
        return [row]
    row = _split_implicit_prompt(row)
    prompt = row.get("prompt")
    return [{"prompt": prompt, "completion": row["chosen"], "label": True},
            {"prompt": prompt, "completion": row["rejected"], "label": False}]


def load_preference_data(path: str | Path | DataSource, tokenizer: Any, kind: str = "pairs",
                         max_length: int | None = 1024, *, columns: str | dict | None = None,
                         split: str | None = None, config: str | None = None) -> tuple[list[dict], DataReport]:
    """Read pairs (``kind="pairs"``) or KTO rows (``kind="kto"``; pairs are unpaired) into feature
    dicts, with a report of what was kept and skipped. ``path`` is any source SFT data can be
    (a file, a saved dataset, a hub id; ``split``/``config`` choose in it); ``columns`` maps
    adaptune's names to the data's (``"chosen=better,rejected=worse"``)."""
    if kind not in KINDS:
        raise ConfigError(f"preference data kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    source = as_source(path, None, columns, split, config)
    if source.kind == TEXT:  # preference rows are JSON whatever the file's suffix
        source = dataclasses.replace(source, fmt="json")
    path = source.path
    report = DataReport(source.path, name=source.name)
    rows = read_rows(source, report)
    report.rows_read = len(rows)
    found = detect_kind(path, rows)
    if kind == "pairs" and found == "kto":
        raise DataError(f"{path}: holds KTO rows (prompt, completion, label); pair objectives need "
                        "'prompt', 'chosen' and 'rejected' (train these with --objective kto)")
    report.fmt = found if found == kind else "pairs, unpaired for KTO"
    build = pair_feature if kind == "pairs" else kto_feature
    features: list[dict] = []
    for where, row in rows:
        for item in (_unpaired(row) if kind == "kto" else [row]):
            try:
                if isinstance(item, BadRow):
                    raise item
                if not isinstance(item, dict):
                    raise BadRow("not a JSON object")
                feature, truncated = build(item, tokenizer, max_length)
            except BadRow as bad:
                report.skip(str(bad), where)
                continue
            report.truncated += truncated
            features.append(feature.as_dict())
    _finish(path, features, report)
    return features, report


def _answers(feature: dict) -> list[list[int]]:
    return [feature[k] for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in feature]


def _finish(path: str, features: list[dict], report: DataReport) -> None:
    report.examples_kept = len(features)
    report.tokens = sum(len(f["prompt_ids"]) * len(_answers(f)) + sum(map(len, _answers(f))) for f in features)
    report.trained_tokens = sum(sum(map(len, _answers(f))) for f in features)
    if not features:
        why = f": {report.skipped_text()}" if report.skipped else ""
        raise DataError(f"{path}: no usable rows in {report.rows_read} read{why}")


def add_kl_completions(features: list[dict], batch_size: int) -> list[dict]:
    """KTO's mismatched answers: in each run of ``batch_size`` rows, row i gets row i-1's completion
    (the first gets the last's) as ``KL_completion_ids``, as TRL builds them; the KL term of a batch
    then compares the same answers under other prompts."""
    out = []
    for start in range(0, len(features), batch_size):
        block = features[start:start + batch_size]
        shifted = [block[-1]["completion_ids"]] + [f["completion_ids"] for f in block[:-1]]
        out += [{**f, "KL_completion_ids": kl} for f, kl in zip(block, shifted)]
    return out


# --------------------------------------------------------------------------- collating

LAYOUTS = ("shared", "packed", "padded")


class _Rows:
    """Token rows being built, and the predictions to score: (row, column of the predicting output,
    target token, sequence, whether the target is an answer token)."""

    def __init__(self) -> None:
        self.ids: list[list[int]] = []
        self.positions: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.targets: list[tuple[int, int, int, int, bool]] = []

    def new_row(self) -> None:
        self.ids.append([])
        self.positions.append([])
        self.labels.append([])

    def add(self, tokens: list[int], positions: list[int], answer_from: int) -> int:
        """Append tokens to the last row (labels on those from ``answer_from``); returns their first column."""
        col = len(self.ids[-1])
        self.ids[-1] += tokens
        self.positions[-1] += positions
        self.labels[-1] += [IGNORE_INDEX] * answer_from + tokens[answer_from:]
        return col

    def score(self, col: int, tokens: list[int], seq: int, answer_from: int) -> None:
        """Token j >= 1 of ``tokens`` (placed at ``col``) is predicted by the output at ``col + j - 1``."""
        row = len(self.ids) - 1
        self.targets += [(row, col + j - 1, tokens[j], seq, j >= answer_from) for j in range(1, len(tokens))]


class PreferenceCollator:
    """A batch of pair (or KTO) feature dicts -> the tensors of one forward pass.

    Sequences: a batch of B pairs gives prompt + chosen for each pair, then prompt + rejected
    (TRL's order: sequence k is pair k's chosen, B + k its rejected); KTO rows give prompt +
    completion, and their prompt + ``KL_completion_ids`` as a second group under ``KL_`` keys.

    Layouts: ``"shared"`` puts all pairs in one row, each as ``prompt, chosen, rejected`` with the
    rejected answer's positions going on from the prompt (the prompt runs once; needs
    ``training.preference.attention``); ``"packed"`` puts all sequences back to back in one row,
    positions restarting at 0 at each (adaptune's packed attention keeps them apart); ``"padded"``
    gives one right-padded row per sequence with an ``attention_mask``, as TRL's collator. The
    packed rows hold no padding at all.

    Keys: ``input_ids``, ``position_ids`` or ``attention_mask``, ``labels`` (answer tokens, -100
    elsewhere); the predictions to score: ``target_index`` (the flat position, in the rows, of the
    output that predicts the token), ``target_ids``, ``target_sequence`` and ``target_answer``
    (answer token, else prompt token); ``answer_tokens`` (answer length of each sequence); one value
    per pair / row: ``index`` (when the features have one) and ``label`` (KTO).
    """

    def __init__(self, pad_token_id: int, packing: bool | str = True, max_length: int | None = None) -> None:
        if pad_token_id is None:
            raise ConfigError("PreferenceCollator needs a pad_token_id (data.pad_token_id_for(tokenizer))")
        layout = packing if isinstance(packing, str) else ("packed" if packing else "padded")
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.pad_token_id = int(pad_token_id)
        self.layout = layout
        self.max_length = max_length

    def _cut(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        """prompt + answer kept to max_length from the start, as TRL truncates."""
        if not self.max_length:
            return list(prompt), list(answer)
        return list(prompt[:self.max_length]), list(answer[:max(self.max_length - len(prompt), 0)])

    def _group(self, items: list[tuple[list[int], list[list[int]]]], prefix: str = "") -> dict[str, torch.Tensor]:
        """Lay out (prompt, answers) items: answer k of item i is sequence i + k * len(items)."""
        rows = _Rows()
        lengths = [0] * sum(len(answers) for _, answers in items)
        if self.layout != "padded":
            rows.new_row()
        for i, (prompt, answers) in enumerate(items):
            root = None
            for k, answer in enumerate(answers):
                seq = i + k * len(items)
                lengths[seq] = len(answer)
                if self.layout == "padded":
                    rows.new_row()
                if self.layout == "shared" and root is not None and prompt:
                    col = rows.add(answer, list(range(len(prompt), len(prompt) + len(answer))), 0)
                    if answer:  # its first token is predicted by the prompt's last output
                        rows.targets.append((0, root + len(prompt) - 1, answer[0], seq, True))
                    rows.score(col, answer, seq, 0)
                    continue
                tokens = prompt + answer
                root = rows.add(tokens, list(range(len(tokens))), len(prompt))
                rows.score(root, tokens, seq, len(prompt))
        return self._tensors(rows, lengths, prefix)

    def _tensors(self, rows: _Rows, lengths: list[int], prefix: str) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows.ids)
        pad = [width - len(r) for r in rows.ids]
        out = {"input_ids": [r + [self.pad_token_id] * p for r, p in zip(rows.ids, pad)],
               "labels": [r + [IGNORE_INDEX] * p for r, p in zip(rows.labels, pad)]}
        if self.layout == "padded":
            out["attention_mask"] = [[1] * len(r) + [0] * p for r, p in zip(rows.ids, pad)]
        else:
            out["position_ids"] = rows.positions
        batch = {prefix + k: torch.tensor(v) for k, v in out.items()}
        targets = rows.targets
        batch[prefix + "target_index"] = torch.tensor([r * width + c for r, c, *_ in targets], dtype=torch.long)
        batch[prefix + "target_ids"] = torch.tensor([t[2] for t in targets], dtype=torch.long)
        batch[prefix + "target_sequence"] = torch.tensor([t[3] for t in targets], dtype=torch.long)
        batch[prefix + "target_answer"] = torch.tensor([t[4] for t in targets], dtype=torch.bool)
        batch[prefix + "answer_tokens"] = torch.tensor(lengths, dtype=torch.float32)
        return batch

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        features = list(features)

        def item(f: dict, keys: tuple[str, ...]) -> tuple[list[int], list[list[int]]]:
            return self._cut(f["prompt_ids"], [])[0], [self._cut(f["prompt_ids"], f[k])[1] for k in keys]

        if "chosen_ids" in features[0]:
            batch = self._group([item(f, ("chosen_ids", "rejected_ids")) for f in features])
        else:
            batch = self._group([item(f, ("completion_ids",)) for f in features])
            batch["label"] = torch.tensor([bool(f["label"]) for f in features])
            if "KL_completion_ids" in features[0]:
                batch.update(self._group([item(f, ("KL_completion_ids",)) for f in features], prefix="KL_"))
        if "index" in features[0]:
            batch["index"] = torch.tensor([int(f["index"]) for f in features])
        return batch
