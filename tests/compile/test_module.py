"""Compile any nn.Module (asap.compile.module): a foreign encoder defined here, its data and forward, its artifact.

Oracles: the in-memory compiled model (a loaded artifact must give the same
outputs), the plain forward (a forward that catches exceptions must calibrate
to the same coefficients), and the model before the call (an error leaves it
as it was).
"""

from __future__ import annotations

import copy
import doctest
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import asap.compile.module as compiled_module
from asap.attention.operators import AsapOperator, SinkhornOperator, SoftmaxOperator
from asap.compile import compile_module, load_compiled_module, save_compiled_module
from asap.compile.artifact import ArtifactError, ManifestError, UnsafeArtifactPathError
from asap.compile.module import FORMAT

VOCAB, DIM, HEADS, N = 30, 16, 2, 10


class Attention(nn.Module):
    """A user's own attention block: its own projections, an asap operator as the normaliser."""

    def __init__(self, operator: nn.Module):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.normaliser = operator

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return self.out(self.normaliser(q, k, v, padding_mask=mask).transpose(1, 2).reshape(b, n, DIM))


class TinyEncoder(nn.Module):
    """Two attention layers, an output head tied to the embedding, a counter of completed forwards."""

    def __init__(self, *, seed: int = 0, shared: bool = False, n_iters: int = 5):
        super().__init__()
        torch.manual_seed(seed)
        one = SinkhornOperator(n_iters=n_iters)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Attention(one if shared else SinkhornOperator(n_iters=n_iters)) for _ in range(2))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        with torch.no_grad():  # peaked attention, so that the fit is not trivial
            for layer in self.layers:
                layer.qkv.weight.mul_(4.0)
        self.completed = 0

    def forward(self, tokens, mask):
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x, mask)
        self.completed += 1
        return self.head(x)


def rows(count: int = 16, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(3, N + 1, (), generator=gen))
        out.append({"tokens": torch.randint(0, VOCAB, (N,), generator=gen), "mask": torch.arange(N) < length,
                    "label": int(torch.randint(0, 2, (), generator=gen))})  # fmt: skip
    return out


def loader(count: int = 16) -> DataLoader:
    return DataLoader(rows(count), batch_size=4)


def call(model, batch):
    return model(batch["tokens"], batch["mask"])


def operators(model) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, (SinkhornOperator, AsapOperator))]


def coefs(model) -> list[torch.Tensor]:
    return [m.dual_map.coef for m in model.modules() if isinstance(m, AsapOperator)]


@pytest.fixture(scope="module")
def compiled():
    model = TinyEncoder().eval()
    result, report = compile_module(model, loader(), forward=call, num_slices=4)
    return result, report


def test_compiles_a_foreign_model_in_place_from_a_dataloader_of_dicts(compiled):
    model, report = compiled
    assert operators(model) == [AsapOperator, AsapOperator] and not model.training
    assert report["selected"] == ["layers.0.normaliser", "layers.1.normaliser"] and report["num_sinkhorn_layers"] == 2
    assert report["calibration"] == {"batches": 4, "held_out_batches": 1}
    assert report["layers"][0]["sequences"] == {"fit": 12, "held_out": 4}
    assert model.completed == 1  # only the first batch ran to the end: the others were cut after layer 1
    teacher = TinyEncoder().eval()
    batch = next(iter(loader()))
    with torch.no_grad():
        out, ref = call(model, batch), call(teacher, batch)
        zero = copy.deepcopy(model)
        for c in coefs(zero):
            c.zero_()
        err, err_zero = (out - ref).abs().mean(), (call(zero, batch) - ref).abs().mean()
    assert torch.isfinite(out).all() and err < err_zero


def test_save_and_load_into_a_fresh_instance(compiled, tmp_path):
    model, report = compiled
    save_compiled_module(model, tmp_path, report=report)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["module_class"].endswith("TinyEncoder")
    assert [op["name"] for op in manifest["operators"]] == ["layers.0.normaliser", "layers.1.normaliser"]
    assert manifest["operators"][0]["options"]["num_slices"] == 4 and manifest["operators"][0]["dtype"] == "float32"
    assert manifest["tied"] == {"head.weight": "embed.weight"}
    fresh = TinyEncoder(seed=1).eval()  # other weights until loaded
    loaded = load_compiled_module(fresh, tmp_path)
    assert loaded is fresh and operators(loaded) == [AsapOperator, AsapOperator]
    assert loaded.head.weight is loaded.embed.weight
    for batch in loader():
        with torch.no_grad():
            torch.testing.assert_close(call(loaded, batch), call(model, batch), atol=1e-6, rtol=0)


def test_a_shared_operator_is_calibrated_on_every_call_and_stays_shared(tmp_path):
    model = TinyEncoder(shared=True).eval()
    compile_module(model, loader(8), forward=call, num_slices=3, holdout_fraction=0.0)
    first, second = model.layers[0].normaliser, model.layers[1].normaliser
    assert isinstance(first, AsapOperator) and first is second
    save_compiled_module(model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["operators"][0]["aliases"] == ["layers.1.normaliser"]
    fresh = load_compiled_module(TinyEncoder(seed=1, shared=True).eval(), tmp_path)
    assert fresh.layers[0].normaliser is fresh.layers[1].normaliser
    batch = next(iter(loader(8)))
    with torch.no_grad():
        torch.testing.assert_close(call(fresh, batch), call(model, batch), atol=1e-6, rtol=0)
    # Both layers' calls reached the fit: 2 calls of 4 sequences per batch.
    shared = TinyEncoder(shared=True).eval()
    _, report = compile_module(shared, loader(8), forward=call, num_slices=3, holdout_fraction=0.0)
    assert report["layers"][0]["sequences"]["fit"] == 16


def test_selection_by_name_index_and_predicate():
    model = TinyEncoder().eval()
    _, report = compile_module(model, loader(8), forward=call, select="layers.1", num_slices=3)
    assert operators(model) == [SinkhornOperator, AsapOperator] and report["selected"] == ["layers.1.normaliser"]
    model = TinyEncoder().eval()
    compile_module(model, loader(8), forward=call, select=["layers.0.normaliser"], num_slices=3)
    assert operators(model) == [AsapOperator, SinkhornOperator]
    model = TinyEncoder().eval()
    compile_module(model, loader(8), forward=call, select=lambda name, op: name.startswith("layers.1"), num_slices=3)
    assert operators(model) == [SinkhornOperator, AsapOperator]
    with pytest.raises(ValueError, match=r"no submodule 'layers\.7'"):
        compile_module(TinyEncoder(), loader(8), forward=call, select="layers.7")
    with pytest.raises(ValueError, match="'head' holds no Sinkhorn operator"):
        compile_module(TinyEncoder(), loader(8), forward=call, select="head")
    with pytest.raises(ValueError, match="out of range"):
        compile_module(TinyEncoder(), loader(8), forward=call, select=[2])
    with pytest.raises(ValueError, match="predicate accepts none"):
        compile_module(TinyEncoder(), loader(8), forward=call, select=lambda name, op: False)


def test_a_model_without_sinkhorn_attention_is_refused():
    model = TinyEncoder()
    for layer in model.layers:
        layer.normaliser = SoftmaxOperator()
    with pytest.raises(ValueError, match="TinyEncoder has no Sinkhorn attention operator to compile"):
        compile_module(model, loader(8), forward=call)
    with pytest.raises(ArtifactError, match="no ASAP operator to save"):
        save_compiled_module(model, "unused")
    model.layers[0].normaliser = AsapOperator(num_heads=HEADS, head_dim=DIM // HEADS)  # built, never fitted
    with pytest.raises(ArtifactError, match="layers.0.normaliser: its dual map was never fitted"):
        save_compiled_module(model, "unused")


class Boom(Exception):
    pass


def _unchanged(model: TinyEncoder) -> None:
    assert operators(model) == [SinkhornOperator, SinkhornOperator]
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("mode", ["teacher", "sequential"])
def test_an_error_of_the_users_forward_or_model_propagates_unchanged(mode):
    raised = Boom("batch 3 is bad")
    seen = []

    def failing(model, batch):
        seen.append(1)
        if len(seen) == 3 + (4 if mode == "sequential" else 0):  # sequential: during the second layer's pass
            raise raised
        return call(model, batch)

    model = TinyEncoder().train()
    with pytest.raises(Boom) as info:
        compile_module(model, loader(), forward=failing, mode=mode, num_slices=3)
    assert info.value is raised
    _unchanged(model)  # sequential: layer 0, already swapped, is put back
    assert model.training

    class Broken(TinyEncoder):
        def forward(self, tokens, mask):
            if self.completed >= 1:
                raise KeyError("the model's own error")
            return super().forward(tokens, mask)

    broken = Broken().eval()
    with pytest.raises(KeyError, match="the model's own error"):
        compile_module(broken, loader(), forward=call, mode=mode, num_slices=3)
    _unchanged(broken)


def test_a_forward_that_catches_exceptions_calibrates_the_same():
    plain, _ = compile_module(TinyEncoder().eval(), loader(), forward=call, num_slices=4)

    def catch_exception(model, batch):
        try:
            return call(model, batch)
        except Exception:  # noqa: BLE001 - the user's broad catch: the calibration's cut must pass through
            raise AssertionError("the calibration cut was caught as an Exception") from None

    def wrap_and_reraise(model, batch):
        try:
            return call(model, batch)
        except Exception as err:
            raise RuntimeError(f"batch failed: {err}") from err

    def swallow_everything(model, batch):
        for _ in range(2):  # a retry loop that also swallows BaseException: the retry observes nothing
            try:
                return call(model, batch)
            except BaseException:  # noqa: BLE001
                continue
        return None

    for forward in (catch_exception, wrap_and_reraise, swallow_everything):
        model = TinyEncoder().eval()
        compile_module(model, loader(), forward=forward, num_slices=4)
        assert model.completed == 1, forward.__name__
        for got, want in zip(coefs(model), coefs(plain)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    # Without the cut, every forward runs to the end and the statistics are the same.
    full = TinyEncoder().eval()
    compile_module(full, loader(), forward=call, num_slices=4, stop_early=False)
    assert full.completed == 4
    for got, want in zip(coefs(full), coefs(plain)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_generators_and_default_forward():
    """A one-shot generator of (tokens, mask) tuples, called as model(*item); held out every 4th batch."""

    def stream():
        for batch in loader():
            yield batch["tokens"], batch["mask"]

    model = TinyEncoder().eval()
    _, report = compile_module(model, stream(), num_slices=3)
    assert operators(model) == [AsapOperator, AsapOperator]
    assert report["calibration"] == {"batches": 4, "held_out_batches": 1}
    with pytest.raises(ValueError, match="not a one-shot iterator"):
        compile_module(TinyEncoder(), stream(), mode="sequential")
    with pytest.raises(ValueError, match="at least one batch"):
        compile_module(TinyEncoder(), iter([]), forward=call)


# ----------------------------------------------------------------------------------------------------- the artifact


@pytest.fixture
def saved(compiled, tmp_path):
    save_compiled_module(compiled[0], tmp_path)
    return tmp_path


def _edit(folder, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""])
def test_weights_names_that_leave_the_folder_are_refused_before_any_file_is_opened(saved, monkeypatch, name):
    (saved.parent / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    _edit(saved, lambda m: m["weights"].update(file=name))

    def opened(*args, **kwargs):
        raise AssertionError("a weights file was opened")

    monkeypatch.setattr(compiled_module, "read_weights_header", opened)
    monkeypatch.setattr(compiled_module, "read_checked_tensors", opened)
    fresh = TinyEncoder(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(UnsafeArtifactPathError, match="weights.file"):
        load_compiled_module(fresh, saved)
    _unchanged(fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def _op(m):
    return m["operators"][0]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m.update(format="asap-compiled"), "format"),
        (lambda m: m.update(format_version=2), "format_version"),
        (lambda m: m.pop("operators"), "'operators' is missing"),
        (lambda m: m.update(operators=[]), "operators must be a list of 1"),
        (lambda m: m["weights"].update(sha256="abc"), "weights.sha256"),
        (lambda m: _op(m).update(name="layers..normaliser"), r"operators\[0\].name"),
        (lambda m: _op(m).update(name="layers.1.normaliser"), r"operators\[1\].name 'layers.1.normaliser' appears twice"),
        (lambda m: _op(m).update(aliases="layers.1"), r"operators\[0\].aliases"),
        (lambda m: _op(m).update(method="sinkhorn"), r"operators\[0\].method"),
        (lambda m: _op(m)["options"].update(n_iters=3), r"operators\[0\].options are invalid .*n_iters"),
        (lambda m: _op(m)["options"].update(num_slices=0), r"operators\[0\].options are invalid .*num_slices"),
        (lambda m: _op(m)["options"].update(map_options={"depth": 3}), r"operators\[0\].options are invalid .*'linear' does not take"),
        (lambda m: _op(m)["options"].update(map_kind="spline"), r"operators\[0\].options are invalid .*map_kind"),
        (lambda m: _op(m).update(num_heads=0), r"operators\[0\].num_heads"),
        (lambda m: _op(m).update(head_dim=2**40), r"operators\[0\].head_dim"),
        (lambda m: _op(m).update(dtype="int8"), r"operators\[0\].dtype"),
        (lambda m: m.update(tied={"a": "a"}), r"tied\['a'\]"),
        (lambda m: m.update(tied=[]), "tied must be"),
        (lambda m: m.update(report="yes"), "report must be"),
    ],
)
def test_malformed_manifests_are_refused_naming_file_and_field(saved, change, field):
    _edit(saved, change)
    with pytest.raises(ManifestError, match=field) as info:
        load_compiled_module(TinyEncoder(seed=1), saved)
    assert str(saved / "manifest.json") in str(info.value) and "\n" not in str(info.value)


def test_weights_that_do_not_fit_are_refused_before_reading_them(saved, monkeypatch):
    from safetensors.torch import load_file, save_file

    _edit(saved, lambda m: _op(m)["options"].update(num_slices=7))  # the header has 4 slices
    monkeypatch.setattr(compiled_module, "sha256_file", lambda *a: pytest.fail("hashed before the shape check"))
    with pytest.raises(ArtifactError, match="shape/dtype mismatches"):
        load_compiled_module(TinyEncoder(seed=1), saved)
    _edit(saved, lambda m: _op(m)["options"].update(num_slices=4))
    monkeypatch.undo()
    # A name the fresh model does not have, or where it has something else than an attention operator.
    _edit(saved, lambda m: _op(m).update(name="layers.0.qkv"))
    with pytest.raises(ManifestError, match=r"operators\[0\].name 'layers.0.qkv' is a Linear"):
        load_compiled_module(TinyEncoder(seed=1), saved)
    _edit(saved, lambda m: _op(m).update(name="blocks.0.normaliser"))
    with pytest.raises(ManifestError, match="not in the given TinyEncoder"):
        load_compiled_module(TinyEncoder(seed=1), saved)
    _edit(saved, lambda m: _op(m).update(name="layers.0.normaliser"))
    # Non-finite weights, with a manifest whose hash matches them.
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["layers.0.normaliser.dual_map.coef"][0, 0] = float("nan")
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": json.dumps(FORMAT), "format_version": "1"})
    _edit(saved, lambda m: m["weights"].update(sha256=compiled_module.sha256_file(saved / "model.safetensors")))
    fresh = TinyEncoder(seed=1)
    with pytest.raises(ArtifactError, match="non-finite"):
        load_compiled_module(fresh, saved)
    _unchanged(fresh)


def test_the_module_docstring_example_runs():
    result = doctest.testmod(compiled_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


def test_a_converted_transformers_encoder_compiles_saves_and_loads(tmp_path):
    pytest.importorskip("transformers", reason="the optional extra asap-attention[hf] is not installed")
    from transformers import BertConfig, BertModel

    from asap.integrations.transformers import convert

    config = BertConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, num_hidden_layers=2, intermediate_size=32,
                        max_position_embeddings=16, initializer_range=0.2)  # fmt: skip
    torch.manual_seed(0)
    model = convert(BertModel(config).eval(), "sinkhorn", n_iters=3)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        mask = (torch.arange(8)[None, :] < torch.randint(3, 9, (4, 1), generator=gen)).long()
        batches.append({"input_ids": torch.randint(1, 40, (4, 8), generator=gen), "attention_mask": mask})
    _, report = compile_module(model, batches, select="encoder.layer.1", num_slices=3)  # model(**batch)
    assert report["selected"] == ["encoder.layer.1.attention.self.asap_operator"]
    save_compiled_module(model, tmp_path)
    torch.manual_seed(1)
    fresh = load_compiled_module(convert(BertModel(config).eval(), "sinkhorn", n_iters=3), tmp_path)
    assert isinstance(fresh.encoder.layer[1].attention.self.asap_operator, AsapOperator)
    assert isinstance(fresh.encoder.layer[0].attention.self.asap_operator, SinkhornOperator)
    with torch.no_grad():
        got, want = fresh(**batches[0]).last_hidden_state, model(**batches[0]).last_hidden_state
    real = batches[0]["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=0)
