"""adaptune's preference trainers against TRL's (the test-only oracle): the same batch gives the same
loss and the same gradients on the adapter, to fp32 tolerance, for each objective and loss type,
packed or padded, with reference log-probs computed on use or cached.

Both sides start from one tiny Llama with one LoRA adapter (peft's for TRL, adaptune's here, the
same weights; B drawn non-zero so that the policy differs from the reference). TRL tokenizes the
rows; adaptune is given TRL's token ids, so the two compute on identical sequences. The oracle is
TRL's own code: ``DPOTrainer.compute_loss``, ``KTOTrainer.compute_loss``, and the experimental
``ORPOTrainer`` / ``CPOTrainer`` ``get_batch_loss_metrics``.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

import adaptune  # noqa: E402
from tests.tiny import WORDS, make_tokenizer, tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
PAIRS = 4


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": words(rng.randint(2, 6)), "chosen": " " + words(rng.randint(1, 6)),
             "rejected": " " + words(rng.randint(1, 8))} for _ in range(n)]


def _kto_rows(n: int) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(_rows(n, seed=1))]


def _same_adapter(trl_model, ours) -> None:
    """Draw the adapter on TRL's side (B non-zero) and copy it, name by name, to adaptune's."""
    torch.manual_seed(1)
    theirs = dict(trl_model.named_parameters())
    with torch.no_grad():
        for name, p in theirs.items():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
        mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        assert mine and set(mine) == {n for n, p in theirs.items() if p.requires_grad}
        for name, p in mine.items():
            p.copy_(theirs[name])


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(ours_loss, trl_loss, ours_model, trl_model) -> None:
    torch.testing.assert_close(ours_loss.detach().float(), trl_loss.detach().float(), rtol=1e-5, atol=1e-5)
    ours_loss.backward()
    trl_loss.backward()
    mine, theirs = _grads(ours_model), _grads(trl_model)
    assert any(g.abs().max() > 0 for g in theirs.values())
    for name, grad in theirs.items():
        torch.testing.assert_close(mine[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _common(tmp_path, **kw) -> dict:
    return dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=PAIRS, report_to="none",
                use_cpu=True, bf16=False, **kw)


def _ours(trainer_cls, config_cls, features, tmp_path, layout: str | bool, **kw):
    """adaptune's trainer with ``layout`` 'shared' (pairs' prompts once), 'packed' or 'padded' (True: the
    leanest it picks, False: padded)."""
    if isinstance(layout, str):
        kw.update(packing=layout != "padded", share_prompt=layout == "shared")
    else:
        kw["packing"] = layout
    args = config_cls(**_common(tmp_path / "ours", **kw))
    trainer = trainer_cls(model=tiny_llama(), args=args, train_dataset=features, processing_class=make_tokenizer(),
                          peft_config=adaptune.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          lora_dropout=0.0))
    trainer.model.train()
    return trainer


def _peft_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")


def _loss(trainer, batch):
    with trainer.batch_attention():
        return trainer.compute_loss(trainer.model, batch)


# ---- DPO (and IPO) -------------------------------------------------------------------------------


def _trl_dpo(tmp_path, **kw):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common(tmp_path / "trl", gradient_checkpointing=False, **kw))
    trainer = DPOTrainer(model=tiny_llama(), args=args, train_dataset=datasets.Dataset.from_list(_rows(PAIRS)),
                         processing_class=make_tokenizer(), peft_config=_peft_config())
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)])
@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
def test_dpo_loss_and_gradients_equal_trl(tmp_path, loss_type, smoothing, layout):
    trl = _trl_dpo(tmp_path, loss_type=loss_type, label_smoothing=smoothing, beta=0.2)
    rows = [trl.train_dataset[i] for i in range(PAIRS)]
    features = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    ours = _ours(adaptune.DPOTrainer, adaptune.DPOConfig, features, tmp_path, layout, loss_type=loss_type,
                 label_smoothing=smoothing, beta=0.2)
    assert ours.layout == layout and ours.reference.kind == "base"
    _same_adapter(trl.model, ours.model)
    batch = ours.data_collator(ours.train_dataset)
    prompts = sum(len(f["prompt_ids"]) for f in features)
    answers = sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    if layout == "padded":
        assert batch["input_ids"].shape[0] == 2 * PAIRS
    else:  # one row, no padding; each prompt in it once when shared
        assert batch["input_ids"].shape == (1, answers + prompts * (1 if layout == "shared" else 2))
    _close(_loss(ours, batch), trl.compute_loss(trl.model, trl.data_collator(rows)), ours.model, trl.model)


def test_dpo_with_cached_reference_equals_trl(tmp_path):
    """Reference log-probs computed in one pass before the step (and read from the cache in it)
    give TRL's loss and gradients; the step itself runs no reference forward."""
    trl = _trl_dpo(tmp_path, beta=0.1)
    rows = [trl.train_dataset[i] for i in range(PAIRS)]
    features = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    ours = _ours(adaptune.DPOTrainer, adaptune.DPOConfig, features, tmp_path, "shared")
    _same_adapter(trl.model, ours.model)
    assert ours.precompute_reference() == PAIRS and ours.ref_cache.known() == PAIRS
    calls = []
    ours.reference_values = lambda *a: calls.append(a)  # a reference forward would now fail the test
    batch = ours.data_collator(ours.train_dataset)
    _close(_loss(ours, batch), trl.compute_loss(trl.model, trl.data_collator(rows)), ours.model, trl.model)
    assert not calls


# ---- ORPO and CPO / SimPO --------------------------------------------------------------------------


def _from_trl_rows(rows: list[dict]) -> list[dict]:
    """TRL's old-style tokenized rows (prompt_input_ids, chosen_input_ids...) as adaptune features."""
    out = []
    for r in rows:
        prompt = r["prompt_input_ids"]
        for side in ("chosen", "rejected"):
            assert r[f"{side}_input_ids"][:len(prompt)] == prompt
            assert all(x == -100 for x in r[f"{side}_labels"][:len(prompt)])
        out.append({"prompt_ids": prompt, "chosen_ids": r["chosen_input_ids"][len(prompt):],
                    "rejected_ids": r["rejected_input_ids"][len(prompt):]})
    return out


@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
def test_orpo_loss_and_gradients_equal_trl(tmp_path, layout):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(**_common(tmp_path / "trl", beta=0.2, max_length=64))
    trl = ORPOTrainer(model=tiny_llama(), args=args, train_dataset=datasets.Dataset.from_list(_rows(PAIRS)),
                      processing_class=make_tokenizer(), peft_config=_peft_config())
    trl.model.train()
    rows = [trl.train_dataset[i] for i in range(PAIRS)]
    ours = _ours(adaptune.ORPOTrainer, adaptune.ORPOConfig, _from_trl_rows(rows), tmp_path, layout, beta=0.2)
    assert ours.reference is None and ours.layout == layout
    _same_adapter(trl.model, ours.model)
    trl_loss, trl_metrics = trl.get_batch_loss_metrics(trl.model, trl.data_collator(rows))
    with ours.batch_attention():
        ours_loss, metrics = ours.compute_loss(ours.model, ours.data_collator(ours.train_dataset),
                                               return_outputs=True)
    assert metrics["nll_loss"] == pytest.approx(trl_metrics["nll_loss"], rel=1e-5)
    _close(ours_loss, trl_loss, ours.model, trl.model)


@pytest.mark.parametrize("loss_type,cpo_alpha,smoothing", [("simpo", 0.0, 0.0), ("simpo", 0.0, 0.1),
                                                            ("sigmoid", 1.0, 0.0), ("hinge", 0.5, 0.0),
                                                            ("ipo", 1.0, 0.0)])
def test_cpo_and_simpo_equal_trl(tmp_path, loss_type, cpo_alpha, smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    kw = dict(beta=2.0 if loss_type == "simpo" else 0.1, loss_type=loss_type, cpo_alpha=cpo_alpha,
              label_smoothing=smoothing)
    trl = CPOTrainer(model=tiny_llama(), args=CPOConfig(**_common(tmp_path / "trl", max_length=64, **kw)),
                     train_dataset=datasets.Dataset.from_list(_rows(PAIRS)), processing_class=make_tokenizer(),
                     peft_config=_peft_config())
    trl.model.train()
    rows = [trl.train_dataset[i] for i in range(PAIRS)]
    ours = _ours(adaptune.CPOTrainer, adaptune.CPOConfig, _from_trl_rows(rows), tmp_path, "shared", **kw)
    _same_adapter(trl.model, ours.model)
    trl_loss, _ = trl.get_batch_loss_metrics(trl.model, trl.data_collator(rows))
    _close(_loss(ours, ours.data_collator(ours.train_dataset)), trl_loss, ours.model, trl.model)


# ---- KTO ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("packing,cached", [(True, False), (False, False), (True, True)])
def test_kto_loss_and_gradients_equal_trl(tmp_path, loss_type, packing, cached):
    from trl import KTOConfig, KTOTrainer

    n = 6
    kw = dict(per_device_train_batch_size=n, beta=0.3, desirable_weight=1.2, undesirable_weight=0.8,
              loss_type=loss_type)
    common = _common(tmp_path / "trl", gradient_checkpointing=False)
    common.pop("per_device_train_batch_size")
    trl = KTOTrainer(model=tiny_llama(), args=KTOConfig(**common, **kw),
                     train_dataset=datasets.Dataset.from_list(_kto_rows(n)), processing_class=make_tokenizer(),
                     peft_config=_peft_config())
    trl.model.train()
    rows = [trl.train_dataset[i] for i in range(n)]
    features = [{k: r[k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label") if k in r}
                for r in rows]
    common = _common(tmp_path / "ours", packing=packing)
    common.pop("per_device_train_batch_size")
    ours = adaptune.KTOTrainer(model=tiny_llama(), args=adaptune.KTOConfig(**common, **kw), train_dataset=features,
                               processing_class=make_tokenizer(),
                               peft_config=adaptune.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               lora_dropout=0.0))
    ours.model.train()
    _same_adapter(trl.model, ours.model)
    if cached:
        assert ours.precompute_reference() == n
    _close(_loss(ours, ours.data_collator(ours.train_dataset)), trl.compute_loss(trl.model, trl.data_collator(rows)),
           ours.model, trl.model)


def test_dpo_against_a_copy_of_the_starting_adapter_equals_trl(tmp_path):
    """A model that comes with an adapter: TRL adds a frozen 'ref' copy of it; adaptune swaps a
    copy of its starting weights in for the reference (what --ref-adapter does). After the adapter
    moves, both give the same loss and gradients."""
    from trl import DPOConfig, DPOTrainer

    theirs = peft.get_peft_model(tiny_llama(), _peft_config())
    mine = adaptune.get_peft_model(tiny_llama(), adaptune.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                     lora_dropout=0.0))
    _same_adapter(theirs, mine)
    trl = DPOTrainer(model=theirs, args=DPOConfig(**_common(tmp_path / "trl", gradient_checkpointing=False)),
                     train_dataset=datasets.Dataset.from_list(_rows(PAIRS)), processing_class=make_tokenizer())
    rows = [trl.train_dataset[i] for i in range(PAIRS)]
    features = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    ours = adaptune.DPOTrainer(model=mine, args=adaptune.DPOConfig(**_common(tmp_path / "ours")),
                               train_dataset=features, processing_class=make_tokenizer())
    assert ours.reference.kind == "adapter"
    torch.manual_seed(2)
    with torch.no_grad():  # "training" moves the adapter away from its start, the same way on both sides
        trainable = {n: p for n, p in mine.named_parameters() if p.requires_grad}
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
                trainable[name].copy_(p)
    trl.model.train()
    ours.model.train()
    _close(_loss(ours, ours.data_collator(ours.train_dataset)), trl.compute_loss(trl.model, trl.data_collator(rows)),
           ours.model, trl.model)


@pytest.mark.parametrize("chat", [False, True])
def test_pairs_are_tokenized_as_trl_tokenizes_them(tmp_path, chat):
    import json

    from trl import DPOConfig, DPOTrainer

    from adaptune.data.preference import load_preference_data

    rows = _rows(6, seed=3)
    if chat:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                 "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]
    trl = DPOTrainer(model=tiny_llama(), args=DPOConfig(**_common(tmp_path / "trl", gradient_checkpointing=False)),
                     train_dataset=datasets.Dataset.from_list(rows), processing_class=make_tokenizer(),
                     peft_config=_peft_config())
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours, _ = load_preference_data(path, make_tokenizer(), "pairs", max_length=1024)
    theirs = [{k: trl.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
              for i in range(len(rows))]
    assert ours == theirs
