"""Influence through LoRA adapters (PEFT): module selection, gradients, scores, CLI loading.

A LoRA layer computes ``y = W₀x + s·B(A x)`` (Hu et al. 2022) with ``A: in → r`` and
``B: r → out`` stored as ``nn.Linear`` modules; ``modules="lora"`` tracks exactly those, so
the gradient captured by the hooks must equal autograd's gradient of the adapter weights,
including the scale ``s = alpha / r`` that PEFT applies after ``B``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import lora, random_lm_data, tiny_gpt2, tiny_llama
from influscope import FitConfig, Influence, ScoreConfig
from influscope.cli import main
from influscope.curvature import IdentityOperator
from influscope.errors import DataError, ModuleMatchError
from influscope.modules import FrozenBaseWarning, default_modules, select_layers
from influscope.modules.passes import layer_passes
from influscope.reference import per_example_gradients
from influscope.storage import model_fingerprint
from influscope.tasks import CausalLMTask

peft = pytest.importorskip("peft")

TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Zorin Quell was born in Ostrava.",
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent.",
]


def test_presets_pick_the_adapters_and_warn_about_frozen_bases():
    model = lora(tiny_gpt2())
    names = [t.name for t in select_layers(model, "lora")]
    # 2 blocks × 3 wrapped modules (attention c_attn/c_proj, MLP c_fc/c_proj) × (A, B)
    assert len(names) == 2 * 4 * 2
    assert all(n.endswith((".lora_A.default", ".lora_B.default")) for n in names)
    assert [t.name for t in select_layers(model, "trainable")] == names
    assert default_modules(model) == "lora" and default_modules(tiny_gpt2()) == "mlp"
    assert Influence(model, CausalLMTask()).layer_names == names  # the facade's default
    with pytest.warns(FrozenBaseWarning, match="modules='lora'"):
        mlp = select_layers(model, "mlp")
    assert any(t.name.endswith(".base_layer") for t in mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_layers(tiny_gpt2(), "mlp")  # no adapters: no warning
    frozen = tiny_gpt2().requires_grad_(False)
    with pytest.raises(ModuleMatchError, match="trainable module"):
        select_layers(frozen, "trainable")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("objective", ["loss", "measurement"])
def test_hooked_adapter_gradients_match_autograd(objective, arch):
    model = lora(tiny_gpt2() if arch == "gpt2" else tiny_llama())
    inf = Influence(model, CausalLMTask(), modules="lora")
    data = random_lm_data(5, prompt_len=2)
    ref = per_example_gradients(model, inf.task, inf.layers, data, objective)

    fast = {t.name: [] for t in inf.layers}
    for _, grads, _ in layer_passes(
        model, inf.task, inf.layers, data, batch_size=2, objective=objective
    ):
        for name, lb in grads.items():
            fast[name].append(lb.gradient())
    for name, parts in fast.items():
        got = torch.cat(parts)
        assert got.abs().sum() > 0, name  # B ≠ 0, so A's gradient is not zero either
        torch.testing.assert_close(got, ref[name], rtol=1e-7, atol=1e-12)


def test_scores_are_the_adapter_gradient_dot_products():
    """Identity curvature: I(z, q) = −∇_φ f_q · ∇_φ L_z over the adapter weights φ only."""
    model = lora(tiny_gpt2())
    inf = Influence(model, CausalLMTask(), modules="lora")
    train, queries = random_lm_data(6, seed=1), random_lm_data(3, seed=2, prompt_len=3)
    cfg = ScoreConfig(query_rank=None, batch_size=4)
    got = inf.score(queries, train, IdentityOperator({t.name: 0.0 for t in inf.layers}), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(inf.layers)  # bias-free adapters: one weight per tracked module

    def flat_grad(value):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])

    task = inf.task
    g_train = torch.stack(
        [flat_grad(task.training_loss(model, task.collate([ex])).sum()) for ex in train.examples]
    )
    g_query = torch.stack(
        [flat_grad(task.measurement(model, task.collate([ex])).sum()) for ex in queries.examples]
    )
    torch.testing.assert_close(got.pairwise, -(g_query @ g_train.t()), rtol=1e-7, atol=1e-12)


def test_frozen_inference_adapter_gives_the_same_scores_and_stays_frozen(tmp_path):
    """``PeftModel.from_pretrained`` freezes the adapter; capture must still differentiate it."""
    trained = lora(tiny_gpt2())
    trained.save_pretrained(tmp_path / "adapter")
    frozen = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter").eval()
    assert not any(p.requires_grad for p in frozen.parameters())
    train, queries = random_lm_data(8, seed=3), random_lm_data(2, seed=4, prompt_len=2)
    out = []
    for model in (trained, frozen):
        inf = Influence(model, CausalLMTask(), modules="lora")
        op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
        out.append(inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise)
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-12)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.grad is None for p in frozen.parameters())


def test_fingerprint_sees_the_untracked_base_weights():
    """Same adapter on another base model: the tracked weights are equal, the model is not."""
    a, b = lora(tiny_gpt2(seed=0)), lora(tiny_gpt2(seed=5))
    la, lb = select_layers(a, "lora"), select_layers(b, "lora")
    for x, y in zip(la, lb):
        torch.testing.assert_close(x.module.weight, y.module.weight)  # identical adapters
    assert model_fingerprint(a, la) != model_fingerprint(b, lb)
    assert model_fingerprint(a, la) == model_fingerprint(a, select_layers(a, "lora"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A saved tiny base model (tokenizer + GPT-2), a LoRA adapter for it, and data files."""
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny_model

    d = tmp_path_factory.mktemp("lora_cli")
    save_tiny_model(d / "base", TEXTS, n_layer=1)
    base = AutoModelForCausalLM.from_pretrained(d / "base")
    lora(base).save_pretrained(d / "adapter")  # records base_model_name_or_path = d / "base"
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "queries.jsonl").write_text(
        json.dumps({"prompt": "The capital of Velmora is", "completion": " Tarsk."}) + "\n"
    )
    return d


def _cli_scores(d, run, *model_args):
    args = [*model_args, "--train", str(d / "train.jsonl"), "--run", str(d / run)]
    assert main(["fit", *args]) == 0
    assert main(["score", *args, "--queries", str(d / "queries.jsonl"), "--top-k", "4"]) == 0
    return json.loads((d / run / "scores.json").read_text())


def test_cli_adapter_option_and_adapter_directory_agree(adapter_dir):
    d = adapter_dir
    explicit = _cli_scores(d, "run1", "--model", str(d / "base"), "--adapter", str(d / "adapter"))
    implicit = _cli_scores(d, "run2", "--model", str(d / "adapter"))
    assert explicit == implicit
    layers = json.loads((d / "run1" / "factors" / "factors" / "meta.json").read_text())
    assert "lora_A" in json.dumps(layers)  # the default preset became 'lora'
    plain = _cli_scores(d, "run3", "--model", str(d / "base"))
    assert plain != explicit  # the adapter changed the model


def test_adapter_errors_are_clear(adapter_dir, tmp_path, capsys):
    config = json.loads((adapter_dir / "adapter" / "adapter_config.json").read_text())
    moved = tmp_path / "adapter"
    moved.mkdir()
    for f in (adapter_dir / "adapter").iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    from influscope.loading import load_model

    with pytest.raises(DataError, match=r"--model BASE_DIR_OR\.gguf --adapter"):
        load_model(moved)
    with pytest.raises(DataError, match=r"has no adapter_config\.json"):
        load_model(adapter_dir / "base", adapter=tmp_path)
    # a run fitted with one adapter is refused for another adapter on the same base
    from transformers import AutoModelForCausalLM

    lora(AutoModelForCausalLM.from_pretrained(adapter_dir / "base"), seed=7).save_pretrained(
        tmp_path / "other"
    )
    args = ["--train", str(adapter_dir / "train.jsonl"), "--run", str(tmp_path / "run")]
    assert main(["fit", "--model", str(adapter_dir / "adapter"), *args]) == 0
    capsys.readouterr()
    base = ["--model", str(adapter_dir / "base")]
    assert main(["fit", *base, "--adapter", str(tmp_path / "other"), *args]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # the base model alone has no adapters to track
    assert main(["fit", *base, "--modules", "lora", *args]) == 2
    assert "No trackable module" in capsys.readouterr().err


def test_gradient_index_over_adapters_is_exact_at_full_width(tmp_path):
    """LESS-style retrieval: a projected index of adapter gradients, exact at full width."""
    from influscope.index import IndexConfig, build_index, preconditioned_queries

    model = lora(tiny_gpt2())
    train, queries = random_lm_data(16, seed=1), random_lm_data(3, seed=2, prompt_len=3)
    inf = Influence(model, CausalLMTask(), modules="lora", device="cpu")
    op = inf.fit(train, FitConfig(curvature="ekfac", fisher="empirical", batch_size=4))
    exact = inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise
    cfg = IndexConfig(k_in=64, k_out=64, fisher="empirical", dtype="float32", batch_size=4)
    index = build_index(inf.tracked, train, tmp_path / "idx", cfg)
    q = preconditioned_queries(inf.tracked, queries, index)
    _, full = index.search(q, k=3, return_all=True)
    torch.testing.assert_close(full.double(), exact, rtol=2e-3, atol=2e-3 * exact.abs().max())
