"""A compiled artifact may come from someone else: its manifest is checked before anything is opened or built.

Issue 12, items 3 and 12: a weights file name that leaves the folder is refused before that file is opened or
hashed; malformed manifests give one :class:`ManifestError` naming the file and the field (never a raw
AttributeError / TypeError / KeyError / RecursionError); a manifest that lies about sizes is caught against the
safetensors header on a ``meta`` model, before any real model is built.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import asap.compile.artifact as artifact_module
from asap.compile import ArtifactError, compile_model, load_compiled, save_compiled
from asap.compile.artifact import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ManifestError,
    UnsafeArtifactPathError,
    sha256_file,
)
from asap.errors import ConfigError, UnsafePathError
from asap.train.checkpoint import save_tensors


@pytest.fixture
def artifact(tmp_path, teacher, batches):
    compiled, report = compile_model(teacher, batches, num_slices=5, layers=[0])
    return save_compiled(tmp_path / "compiled", compiled, report=report, run_config={"data": {"dataset": "toy"}})


def _edit(out, edit):
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    edit(manifest)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))


def _layer(m):
    return m["compiled_layers"][0]


# (id, edit of the manifest, the field the message must name)
MALFORMED = [
    ("weights-string", lambda m: m.update(weights="model.safetensors"), "weights"),
    ("weights-null", lambda m: m.update(weights=None), "weights"),
    ("weights-file-null", lambda m: m["weights"].update(file=None), "weights.file"),
    ("weights-sha-int", lambda m: m["weights"].update(sha256=5), "weights.sha256"),
    ("weights-sha-short", lambda m: m["weights"].update(sha256="ab"), "weights.sha256"),
    ("weights-missing", lambda m: m.pop("weights"), "'weights' is missing"),
    ("model-config-null", lambda m: m.update(model_config=None), "model_config"),
    ("model-config-dim-string", lambda m: m["model_config"].update(dim="16"), "model_config.dim"),
    ("model-config-dim-missing", lambda m: m["model_config"].pop("dim"), "model_config.dim is missing"),
    ("model-config-depth-bool", lambda m: m["model_config"].update(depth=True), "model_config.depth"),
    ("model-config-type", lambda m: m["model_config"].update(model_type="nope"), "model_config.model_type"),
    ("run-config-string", lambda m: m.update(run_config="x"), "run_config"),
    ("layers-object", lambda m: m.update(compiled_layers={}), "compiled_layers"),
    ("layers-null", lambda m: m.update(compiled_layers=None), "compiled_layers"),
    ("layer-string", lambda m: m.update(compiled_layers=["blocks.0"]), "compiled_layers[0]"),
    ("layer-name-int", lambda m: _layer(m).update(name=3), "compiled_layers[0].name"),
    ("layer-name-twice", lambda m: m["compiled_layers"].append(dict(_layer(m))), "compiled_layers[1].name"),
    ("layer-slices-missing", lambda m: _layer(m).pop("slices"), "compiled_layers[0].slices"),
    ("layer-eps-missing", lambda m: _layer(m).pop("eps"), "compiled_layers[0].eps"),
    ("layer-eps-negative", lambda m: _layer(m).update(eps=-1), "compiled_layers[0].eps"),
    ("layer-eps-string", lambda m: _layer(m).update(eps="abc"), "compiled_layers[0].eps"),
    ("layer-scale-negative", lambda m: _layer(m).update(scale=-1), "compiled_layers[0].scale"),
    ("layer-scale-string", lambda m: _layer(m).update(scale="abc"), "compiled_layers[0].scale"),
    ("layer-heads-zero", lambda m: _layer(m).update(num_heads=0), "compiled_layers[0].num_heads"),
    ("layer-heads-other", lambda m: _layer(m).update(num_heads=4), "compiled_layers[0].num_heads is 4"),
    ("layer-head-dim-huge", lambda m: _layer(m).update(head_dim=2**40), "compiled_layers[0].head_dim"),
    ("layer-seed-string", lambda m: _layer(m)["slices"].update(seed="abc"), "compiled_layers[0].slices.seed"),
    ("layer-slice-type", lambda m: _layer(m)["slices"].update(type="spiral"), "compiled_layers[0].slices.type"),
    ("layer-slices-num-null", lambda m: _layer(m)["slices"].update(num=None), "compiled_layers[0].slices.num"),
    ("layer-extra-unknown", lambda m: _layer(m).update(extra_features=["bogus"]), "compiled_layers[0].extra_features"),
    ("layer-teacher-list", lambda m: _layer(m).update(teacher=[1]), "compiled_layers[0].teacher"),
    ("layer-map-kind", lambda m: _layer(m).update(map={"kind": "spline", "options": {}}), "compiled_layers[0].map"),
    ("layer-map-string", lambda m: _layer(m).update(map="relu"), "compiled_layers[0].map"),
    ("layer-map-options", lambda m: _layer(m).update(map={"kind": "linear", "options": {"depth": 3}}),
     "compiled_layers[0].map.options"),
    ("layer-map-options-range", lambda m: _layer(m).update(map={"kind": "mlp", "options": {"hidden": 10**9}}),
     "compiled_layers[0].map.options"),
    ("layer-extra-steps", lambda m: _layer(m).update(extra_steps=-1), "compiled_layers[0].extra_steps"),
    ("layer-extra-steps-bool", lambda m: _layer(m).update(extra_steps=True), "compiled_layers[0].extra_steps"),
]


@pytest.mark.parametrize("edit, field", [pytest.param(e, f, id=i) for i, e, f in MALFORMED])
def test_malformed_manifest_is_one_error_naming_the_file_and_field(artifact, edit, field):
    _edit(artifact, edit)
    with pytest.raises(ManifestError) as info:
        load_compiled(artifact)
    message = str(info.value)
    assert message.startswith(str(artifact / MANIFEST_FILE)) and field in message and "\n" not in message
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ArtifactError)


def test_deeply_nested_manifest_is_refused_naming_the_file(artifact):
    (artifact / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="manifest.json"):
        load_compiled(artifact)


@pytest.fixture
def hashed(monkeypatch):
    """Every path ``sha256_file`` is asked to hash during the test."""
    seen = []
    real = artifact_module.sha256_file
    monkeypatch.setattr(artifact_module, "sha256_file", lambda path: (seen.append(os.fspath(path)), real(path))[1])
    return seen


def _outside_weights(tmp_path, artifact):
    """A copy of the artifact's weights outside it (so the manifest's own hash matches it)."""
    other = tmp_path / "other"
    other.mkdir()
    (other / WEIGHTS_FILE).write_bytes((artifact / WEIGHTS_FILE).read_bytes())
    return other / WEIGHTS_FILE


def test_weights_name_outside_the_folder_is_refused_before_it_is_opened(tmp_path, artifact, hashed):
    outside = _outside_weights(tmp_path, artifact)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for sharing")
    (artifact / "link.safetensors").symlink_to(outside)
    names = ["../other/model.safetensors", str(outside), str(secret), "sub/model.safetensors", "..", "link.safetensors"]
    for name in names:
        _edit(artifact, lambda m: m["weights"].update(file=name))
        with pytest.raises(UnsafeArtifactPathError) as info:
            load_compiled(artifact)
        message = str(info.value)
        assert "weights.file" in message and str(artifact) in message, message
        assert isinstance(info.value, UnsafePathError)
        assert sha256_file(secret)[:12] not in message and sha256_file(outside)[:12] not in message
    assert hashed == []  # nothing was hashed, inside or outside the folder


def test_tokenizer_name_in_the_manifest_must_stay_inside_the_folder(artifact):
    for name in ("../../x", "/etc/hostname"):
        _edit(artifact, lambda m: m.update(run_config={"data": {"dataset": "toy", "tokenizer": name}}))
        with pytest.raises(UnsafeArtifactPathError, match="run_config.data.tokenizer"):
            load_compiled(artifact)


def test_a_file_that_is_not_safetensors_is_refused_before_hashing(artifact, hashed):
    (artifact / WEIGHTS_FILE).write_bytes(b"\x00" * (1 << 20))
    with pytest.raises(ArtifactError, match="corrupted or not a safetensors file"):
        load_compiled(artifact)
    assert hashed == []


def test_a_manifest_that_lies_about_sizes_builds_nothing_real(artifact, monkeypatch, hashed):
    """dim = 65536 once built a 48 GiB model before looking at the weights; now only a meta model is built."""
    real_build = artifact_module.build_model

    def meta_only(config):
        assert torch.empty(0).device.type == "meta", "a real model was built before the header check"
        return real_build(config)

    monkeypatch.setattr(artifact_module, "build_model", meta_only)
    _edit(artifact, lambda m: m["model_config"].update(dim=65536))
    with pytest.raises(ManifestError, match="head_dim is 8, but 'blocks.0.attn.operator' has 32768"):
        load_compiled(artifact)
    _edit(artifact, lambda m: _layer(m).update(head_dim=32768))  # a consistent lie: only the header can tell
    with pytest.raises(ArtifactError, match="shape/dtype mismatches") as info:
        load_compiled(artifact)
    assert "65536" in str(info.value) and hashed == []
    _layer_back = lambda m: (_layer(m).update(head_dim=8), m["model_config"].update(dim=16, depth=1000))  # noqa: E731
    _edit(artifact, _layer_back)
    with pytest.raises(ArtifactError, match="missing keys"):
        load_compiled(artifact)


def test_non_finite_weights_are_refused_even_when_re_signed(artifact):
    from asap.train.checkpoint import load_tensors

    tensors, meta = load_tensors(artifact / WEIGHTS_FILE)
    tensors["blocks.0.attn.operator.dual_map.coef"][0, 0] = float("nan")
    save_tensors(artifact / WEIGHTS_FILE, tensors, metadata=meta)
    _edit(artifact, lambda m: m["weights"].update(sha256=sha256_file(artifact / WEIGHTS_FILE)))
    with pytest.raises(ArtifactError, match="non-finite"):
        load_compiled(artifact)


def test_the_valid_artifact_still_loads(artifact, batches):
    model, manifest = load_compiled(artifact)
    assert manifest["weights"]["file"] == WEIGHTS_FILE
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]["input_ids"], padding_mask=batches[0]["padding_mask"])).all()
