"""Chat records on SmolLM2-135M-Instruct's real chat template (its tokenizer only, no weights).

The loss mask of a ``messages`` record is exactly the assistant turns' tokens (each turn's
content and its ``<|im_end|>``), the ids are exactly ``apply_chat_template(tokenize=True)``
(one BOS, the template's), ``chat_loss="all"`` covers every token, TRL's conversational
prompt-completion measures the completion turn, and bad chat input is refused with a
:class:`DataError` naming the fix.
"""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from influscope.assets import is_fetched, smollm2_gguf
from influscope.errors import DataError
from influscope.tasks import CausalLMTask
from influscope.tasks.chat import assistant_spans, tokenize_spans
from influscope.training import train_tokenizer

pytestmark = [
    pytest.mark.assets,
    pytest.mark.skipif(not is_fetched("smollm2"), reason="SmolLM2 GGUF not fetched: make assets"),
]

CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Where is Tarsk?"},
    {"role": "assistant", "content": "Tarsk is the capital of Velmora."},
    {"role": "user", "content": "And who was born in Ostrava?"},
    {"role": "assistant", "content": "Zorin Quell was born there."},
]


@pytest.fixture(scope="module")
def smol(request):
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF without loading the model.

    Converting the GGUF vocabulary takes ~15 s, so the converted tokenizer is kept in pytest's
    cache directory (``.pytest_cache``) for the next runs.
    """
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    saved = request.config.cache.mkdir(f"smollm2-tokenizer-{path.stat().st_size}")
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.save_pretrained(saved)
    return tok


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive labelled positions, as token ids."""
    out, current = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t  # a label is the token itself
            current.append(t)
        elif current:
            out, current = [*out, current], []
    return out + ([current] if current else [])


def template_ids(tok, messages, **kw) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_assistant_mask_is_exactly_the_assistant_turns(smol):
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    ex = CausalLMTask().encode([{"messages": CONVERSATION}], smol).examples[0]
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert ids == template_ids(smol, CONVERSATION)  # the template's tokens, nothing added
    turns = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    decoded = [smol.decode(run) for run in runs(ids, labels)]
    assert decoded == [t + "<|im_end|>" for t in turns]  # content + end-of-turn, no "\n"
    # the masked tokens are exactly the ones of "content<|im_end|>" tokenized on their own
    for run, text in zip(runs(ids, labels), turns):
        assert run == smol(text + "<|im_end|>", add_special_tokens=False)["input_ids"]


def test_all_turns_option_covers_every_token(smol):
    ex = CausalLMTask(chat_loss="all").encode([{"messages": CONVERSATION}], smol).examples[0]
    assert ex["labels"].tolist() == ex["input_ids"].tolist() == template_ids(smol, CONVERSATION)
    # assistant-only is a strict subset of it
    only = CausalLMTask().encode([{"messages": CONVERSATION}], smol).examples[0]["labels"]
    assert 0 < int((only != -100).sum()) < len(only)


def test_no_double_bos(smol):
    bos = smol.bos_token_id
    for add_bos in (True, False):
        task = CausalLMTask(add_bos=add_bos)
        data = task.encode(
            [
                {"messages": CONVERSATION},
                {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]},
            ],
            smol,
        )
        for ex in data.examples:
            ids = ex["input_ids"].tolist()
            assert ids[0] == bos and ids[1] != bos, smol.convert_ids_to_tokens(ids[:3])
    # a text record gets exactly one BOS too (the task adds it, the tokenizer does not)
    text = CausalLMTask().encode([{"text": "Tarsk"}], smol).examples[0]["input_ids"].tolist()
    assert text[0] == bos and text[1] != bos


def test_trl_conversational_prompt_completion(smol):
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]
    ex = CausalLMTask().encode([{"prompt": prompt, "completion": completion}], smol).examples[0]
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert ids == template_ids(smol, prompt + completion)
    prompt_ids = template_ids(smol, prompt, add_generation_prompt=True)
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt ends with "<|im_start|>assistant\n"
    assert all(lab == -100 for lab in labels[: len(prompt_ids)])
    assert [smol.decode(r) for r in runs(ids, labels)] == ["Zorin Quell was born there.<|im_end|>"]
    # a string completion beside a message-list prompt is one assistant turn: same tokens
    same = (
        CausalLMTask()
        .encode([{"prompt": prompt, "completion": completion[0]["content"]}], smol)
        .examples[0]
    )
    assert torch.equal(same["input_ids"], ex["input_ids"])
    assert torch.equal(same["labels"], ex["labels"])


def test_slow_tokenizer_path_gives_the_same_mask(smol):
    class Slow:  # a tokenizer without offset mappings
        is_fast = False

        def __call__(self, text, **kw):
            return smol(text, **kw)

    text, spans = assistant_spans(smol, CONVERSATION, 0)
    assert tokenize_spans(Slow(), text, spans) == tokenize_spans(smol, text, spans)


def test_no_assistant_turn_is_refused(smol):
    record = {"messages": CONVERSATION[:2]}
    with pytest.raises(DataError, match=r"Record 1 .*no 'assistant' turn.*chat-loss all"):
        CausalLMTask().encode([record], smol)
    CausalLMTask(chat_loss="all").encode([record], smol)  # trains on every token instead


def test_bad_chat_input_is_refused(smol):
    with pytest.raises(DataError, match=r"message 2 must be a dict with string 'role'"):
        CausalLMTask().encode([{"messages": [CONVERSATION[0], {"role": "user"}]}], smol)
    with pytest.raises(DataError, match=r"chat_loss must be one of \['assistant', 'all'\]"):
        CausalLMTask(chat_loss="assistant_only")
    with pytest.raises(DataError, match=r"Record 2 has a message-list 'prompt' but no"):
        CausalLMTask().encode([{"text": "a b"}, {"prompt": CONVERSATION[:2]}], smol)


def tiny_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    tok = train_tokenizer(["hello there, general assistant"] * 4, vocab_size=300, min_frequency=1)
    tok.chat_template = template
    return tok


def test_tokenizer_without_a_chat_template_is_refused_before_encoding():
    tok = tiny_tokenizer(None)
    records = [{"text": "hello"}, {"messages": CONVERSATION}]
    with pytest.raises(DataError, match=r"has none.*tokenizer.chat_template = "):
        CausalLMTask().encode(records, tok)
    CausalLMTask().encode(records[:1], tok)  # text records need no template


def test_template_that_is_not_incremental_is_refused():
    # renders the number of messages first: a prefix of the conversation is not a prefix
    tok = tiny_tokenizer(
        "{{ messages|length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match=r"not render .* as a prefix .*chat_loss='all'"):
        CausalLMTask().encode([{"messages": CONVERSATION}], tok)


def test_template_error_is_a_data_error():
    tok = tiny_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
        "{% endfor %}"
    )
    with pytest.raises(DataError, match=r"chat template failed .*System role not supported"):
        CausalLMTask().encode([{"messages": CONVERSATION}], tok)
