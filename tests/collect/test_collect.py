"""Training-time collection: rows collected in a step equal those recomputed at θ_s afterwards."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from influscope.collect import (
    CollectConfig,
    CollectedGradients,
    GradientCollector,
    InfluenceCallback,
    collected_index,
    collected_tracin,
    load_checkpoint,
    recompute_rows,
    unsupported_settings,
)
from influscope.demo.train import sequence_losses
from influscope.errors import CollectionError, ConfigError, DataError, StaleArtifactError
from influscope.index import IndexConfig, build_index
from influscope.modules.selection import select_layers
from influscope.modules.tracked import TrackedModel
from influscope.tasks import CausalLMTask
from influscope.tasks.data import EncodedDataset
from influscope.trajectory import from_directory

N, VOCAB = 12, 50
CFG = dict(k_in=8, k_out=8, dtype="float64")


def _config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def _f64_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kw):
    """transformers' ForCausalLMLoss without its float32 upcast (float64 end to end)."""
    labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, vocab_size), labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index, reduction="sum" if num_items_in_batch is not None else "mean",
    )  # fmt: skip
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


class F64CausalLM(CausalLMTask):
    """CausalLMTask without the float32 cast of its cross-entropy (an exact float64 oracle)."""

    def loss_from_outputs(self, outputs, batch, sample_seeds=None):
        logits, targets = outputs[:, :-1], batch["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
        ce = nn.functional.cross_entropy(
            logits.transpose(1, 2), targets.clamp_min(0), reduction="none"
        )  # (B, T-1)
        return (ce * targets.ne(-100)).sum(1)


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config()).double()
    model.loss_function = _f64_loss
    return model


def _records() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(N):
        ids = torch.randint(1, VOCAB, (5 + i % 4,), generator=g)
        mask = torch.ones(len(ids), dtype=torch.long)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


def _collate(features: list[dict]) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    batch = {k: torch.full((len(features), width), v, dtype=torch.long) for k, v in pads.items()}
    for row, f in enumerate(features):
        for k in pads:
            batch[k][row, : len(f[k])] = f[k]
    return batch


def _encoded() -> EncodedDataset:
    return EncodedDataset(_records())


def _args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out / "hf"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        remove_unused_columns=False, seed=0, disable_tqdm=True, max_grad_norm=1.0,
    )  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def _train(out, config: CollectConfig, model=None, trainer_cls=Trainer, **kw) -> Trainer:
    data = [{**r, "example_index": i} for i, r in enumerate(_records())]
    callback = InfluenceCallback(out, config)
    trainer = trainer_cls(
        model=model or _model(), args=_args(out, **kw), train_dataset=data,
        data_collator=callback.collator(_collate), callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect")
    trainer = _train(out, CollectConfig(checkpoint_every=2, gradient_every=2, **CFG))
    return out, trainer


def test_trainer_rows_are_gradients_at_the_checkpoint_before_the_step(trained) -> None:
    out, _ = trained
    col = CollectedGradients(out)
    assert col.steps == [0, 2]
    data, task = _encoded(), F64CausalLM()
    for s in col.steps:
        idx, rows, _ = col.load(s)
        assert rows.dtype == torch.float64 and rows.shape == (4, col.dim)
        again = recompute_rows(load_checkpoint(out, s), task, data.subset(idx.tolist()), col)
        torch.testing.assert_close(again, rows, rtol=1e-10, atol=1e-13)
        # ... and not the parameters the step produced (θ_{s+2}, the next checkpoint)
        later = recompute_rows(load_checkpoint(out, s + 2), task, data.subset(idx.tolist()), col)
        assert float((later - rows).norm() / rows.norm()) > 1e-2


def test_trainer_checkpoints_load_as_a_trajectory_with_the_logged_rates(trained) -> None:
    out, trainer = trained
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "loss" in e}
    traj = from_directory(out / "checkpoints")
    assert traj.steps == [2, 4]
    expected = [(logged[1] + logged[2]) / 2, (logged[3] + logged[4]) / 2]
    assert [c.lr for c in traj] == pytest.approx(expected, rel=1e-12)
    final = traj[-1].load()
    for p, q in zip(final.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=0)


def _plain_loop(out, config: CollectConfig, steps: int = 4, batch: int = 4) -> GPT2LMHeadModel:
    model = _model().train()
    data = _records()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1)).tolist()
    with GradientCollector(model, out, config) as collector:
        for k in range(steps):
            idx = [order[(k * batch + j) % N] for j in range(batch)]
            b = _collate([data[i] for i in idx])
            collector.begin(idx, lr=opt.param_groups[0]["lr"])
            losses = sequence_losses(model, b["input_ids"], b["labels"])  # (B,)
            opt.zero_grad(set_to_none=True)
            collector.backward(losses)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            collector.end()
    return model


def test_plain_loop_rows_equal_recomputed(tmp_path) -> None:
    _plain_loop(tmp_path, CollectConfig(checkpoint_every=1, **CFG))
    col, data = CollectedGradients(tmp_path), _encoded()
    assert col.steps == [0, 1, 2, 3]
    for s in col.steps:
        idx, rows, lr = col.load(s)
        assert lr == pytest.approx(1e-2 * (1 - s / 4))
        again = recompute_rows(
            load_checkpoint(tmp_path, s), F64CausalLM(), data.subset(idx.tolist()), col
        )
        torch.testing.assert_close(again, rows, rtol=1e-10, atol=1e-13)


def test_collection_leaves_training_unchanged(tmp_path) -> None:
    plain = _plain_loop(tmp_path / "a", CollectConfig(checkpoint_every=2, **CFG))
    model = _model().train()  # the same loop with no collector: same init, batches, optimizer
    data, steps, batch = _records(), 4, 4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1)).tolist()
    for k in range(steps):
        b = _collate([data[order[(k * batch + j) % N]] for j in range(batch)])
        opt.zero_grad(set_to_none=True)
        sequence_losses(model, b["input_ids"], b["labels"]).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    for p, q in zip(plain.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_trainer_float32_default_loss_agrees_to_float32_rounding(tmp_path) -> None:
    model = GPT2LMHeadModel(_config())  # float32, transformers' own loss
    _train(tmp_path, CollectConfig(checkpoint_every=2, gradient_every=2, k_in=8, k_out=8), model)
    col, data = CollectedGradients(tmp_path), _encoded()
    idx, rows, _ = col.load(2)
    again = recompute_rows(
        load_checkpoint(tmp_path, 2, torch.float32), CausalLMTask(), data.subset(idx.tolist()), col
    )
    assert rows.dtype == torch.float32
    assert float((again - rows).norm() / rows.norm()) < 1e-5


def test_collected_index_equals_the_index_built_at_the_checkpoint(trained, tmp_path) -> None:
    out, _ = trained
    col = CollectedGradients(out)
    idx, _, _ = col.load(2)
    ckpt = load_checkpoint(out, 2)
    mine = collected_index(col, tmp_path / "collected", model=ckpt, steps=[2])
    assert mine.meta["row_indices"] == sorted(idx.tolist()) and mine.meta["row_steps"] == [2] * 4
    layers = select_layers(ckpt, col.layer_names)
    config = IndexConfig(k_in=8, k_out=8, curvature="identity", dtype="float32", batch_size=4)
    data = _encoded().subset(sorted(idx.tolist()))
    ref = build_index(TrackedModel(ckpt, F64CausalLM(), layers), data, tmp_path / "built", config)
    torch.testing.assert_close(mine.rows(range(4)), ref.rows(range(4)), rtol=1e-6, atol=1e-7)
    q = torch.randn(3, col.dim)
    (_, a), (_, b) = mine.search(q, k=2, return_all=True), ref.search(q, k=2, return_all=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_collected_tracin_equals_recomputed(trained) -> None:
    out, _ = trained
    col, task, data = CollectedGradients(out), F64CausalLM(), _encoded()
    queries = EncodedDataset(
        [{"input_ids": r["input_ids"][:4], "attention_mask": r["attention_mask"][:4],
          "labels": torch.tensor([-100, -100, *r["labels"][2:4].tolist()])} for r in _records()[:3]]
    )  # fmt: skip
    got = collected_tracin(col, task, queries, n_train=N).pairwise
    want = torch.zeros(3, N, dtype=torch.float64)
    for s in col.steps:
        idx, _, lr = col.load(s)
        model = load_checkpoint(out, s)
        q = recompute_rows(model, task, queries, col)  # (Q, D) gradients of the loss = −∇f
        train_rows = recompute_rows(model, task, data.subset(idx.tolist()), col)
        want[:, idx] += lr * (q @ train_rows.t())  # −η ∇fᵀ∇L with ∇f = −q
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    seen = {i for s in col.steps for i in col.load(s)[0].tolist()}
    unseen = sorted(set(range(N)) - seen)
    assert unseen and bool((got[:, unseen] == 0).all())


# --- refusals -------------------------------------------------------------------------------
def test_gradient_accumulation_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2"):
        _train(tmp_path, CollectConfig(**CFG), gradient_accumulation_steps=2)


def test_label_smoothing_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"label_smoothing_factor=0\.1"):
        _train(tmp_path, CollectConfig(**CFG), label_smoothing_factor=0.1)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("deepspeed", "ds_config.json", "DeepSpeed"),
        ("fsdp", "full_shard", "FSDP"),
        ("world_size", 2, "world_size=2"),
        ("n_gpu", 2, "DataParallel"),
        ("fp16", True, "fp16=True"),
        ("gradient_checkpointing", True, "gradient_checkpointing"),
        ("torch_compile", True, "torch_compile"),
    ],
)
def test_unsupported_trainer_settings_are_named(field, value, match, tmp_path) -> None:
    args = types.SimpleNamespace(gradient_accumulation_steps=1, **{field: value})
    assert any(match in p for p in unsupported_settings(args))
    callback = InfluenceCallback(tmp_path, CollectConfig(**CFG))
    state = types.SimpleNamespace(global_step=0)
    with pytest.raises(ConfigError, match="cannot collect per-example gradients correctly"):
        callback.on_train_begin(args, state, None, model=_model())


def test_missing_example_index_is_reported() -> None:
    callback = InfluenceCallback("unused", CollectConfig(**CFG))
    with pytest.raises(DataError, match="remove_unused_columns=False"):
        callback.collator(_collate)(_records()[:2])


def test_a_custom_loss_that_reweights_examples_is_caught(tmp_path) -> None:
    class Weighted(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            per_row = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:], reduction="none"
            ).sum(1)  # (B,)
            weights = torch.arange(1, len(per_row) + 1, dtype=per_row.dtype)
            return (weights * per_row).sum() / weights.sum()

    with pytest.raises(CollectionError, match="not a uniform multiple"):
        _train(tmp_path, CollectConfig(**CFG), trainer_cls=Weighted)


def test_plain_loop_refuses_accumulated_gradients(tmp_path) -> None:
    model = _model().train()
    b = _collate(_records()[:2])
    with GradientCollector(model, tmp_path, CollectConfig(**CFG)) as collector:
        collector.begin([0, 1], lr=1e-2)
        collector.backward(sequence_losses(model, b["input_ids"], b["labels"]))
        collector.end()
        collector.begin([0, 1], lr=1e-2)
        losses = sequence_losses(model, b["input_ids"], b["labels"])
        with pytest.raises(ConfigError, match="already hold gradients"):
            collector.backward(losses)  # no zero_grad: this backward would accumulate


def test_a_layer_run_twice_in_a_step_is_caught(tmp_path) -> None:
    model = _model().train()
    b = _collate(_records()[:3])
    with GradientCollector(model, tmp_path, CollectConfig(**CFG)) as collector:
        collector.begin([0, 1, 2], lr=1e-2)
        first = sequence_losses(model, b["input_ids"], b["labels"])
        second = sequence_losses(model, b["input_ids"], b["labels"])  # a second forward
        with pytest.raises(CollectionError, match="ran 2 time"):
            collector.backward(first + second)


def test_config_needs_something_to_collect() -> None:
    with pytest.raises(ConfigError, match="Nothing to collect"):
        CollectConfig(gradients=False, checkpoint_every=None)
    with pytest.raises(ConfigError, match="init must be one of"):
        CollectConfig(init="pca")


def test_checkpoints_need_save_pretrained(tmp_path) -> None:
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="save_pretrained"):
        GradientCollector(plain, tmp_path, CollectConfig(checkpoint_every=1, modules="all"))


def test_index_rows_are_each_examples_latest_collected_gradient(trained, tmp_path) -> None:
    out, _ = trained
    col = CollectedGradients(out)
    index = collected_index(col, tmp_path / "latest")  # model: the newest step's checkpoint
    seen = {s: set(col.load(s)[0].tolist()) for s in col.steps}
    for row, (i, s) in enumerate(zip(index.meta["row_indices"], index.meta["row_steps"])):
        assert s == max(t for t in col.steps if i in seen[t])
        idx, rows, _ = col.load(s)
        want = rows[idx.tolist().index(i)].float()
        torch.testing.assert_close(index.rows([row])[0], want)
    with pytest.raises(StaleArtifactError, match="already exists"):
        collected_index(col, tmp_path / "latest")


def test_reading_an_empty_directory_says_how_to_collect(tmp_path) -> None:
    with pytest.raises(DataError, match="gradients=True"):
        CollectedGradients(tmp_path)
    with pytest.raises(DataError, match="No checkpoint of parameter step 3"):
        load_checkpoint(tmp_path, 3)


def test_checkpoints_only_needs_no_indices(tmp_path) -> None:
    callback = InfluenceCallback(tmp_path, CollectConfig(gradients=False, checkpoint_every=2))
    trainer = Trainer(
        model=_model(), args=_args(tmp_path), train_dataset=_records(),
        data_collator=_collate, callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert not (tmp_path / "gradients").exists() and not (tmp_path / "initial").exists()
    assert from_directory(tmp_path / "checkpoints").steps == [2, 4]
