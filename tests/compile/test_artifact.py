"""Saving and strictly loading compiled models."""

from __future__ import annotations

import json

import pytest
import torch

from asap.attention.operators import AsapOperator
from asap.compile import ArtifactError, compile_model, load_compiled, save_compiled
from asap.compile.artifact import MANIFEST_FILE, WEIGHTS_FILE, sha256_file


KINDS = {"linear": {}, "relu": {"relu": {"depth": 2}}, "mlp": {"mlp": {"hidden": 4}}}


@pytest.fixture(params=list(KINDS))
def artifact(request, tmp_path, teacher, batches):
    """A compiled artifact of each dual-map kind (the linear one as always)."""
    kind = request.param
    compiled, report = compile_model(teacher, batches, num_slices=5, layers=[0], map_kind=kind, map_options=KINDS[kind],
                                     map_steps=10)  # fmt: skip
    out = save_compiled(tmp_path / "compiled", compiled, report=report, run_config={"data": {"dataset": "toy"}},
                        source_sha256="ab" * 32)  # fmt: skip
    return out, compiled


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], padding_mask=batch["padding_mask"])


def test_round_trip_keeps_outputs_and_describes_the_layers(artifact, batches):
    out, compiled = artifact
    loaded, manifest = load_compiled(out)
    assert not loaded.training
    for batch in batches:
        torch.testing.assert_close(_logits(loaded, batch), _logits(compiled, batch), rtol=0, atol=0)
    assert [type(b.attn.operator).__name__ for b in loaded.blocks] == ["AsapOperator", "SinkhornOperator"]
    (layer,) = manifest["compiled_layers"]
    assert layer["name"] == "blocks.0.attn.operator"
    assert layer["teacher"] == {"n_iters": 5, "eps": 1.0}
    assert layer["slices"] == {"type": "random", "num": 5, "seed": 0}
    kind = type(compiled.blocks[0].attn.operator.dual_map).kind
    assert layer["map"]["kind"] == kind and layer["map"]["options"] == compiled.blocks[0].attn.operator.dual_map.map_options
    assert layer["extra_steps"] == 0 and type(loaded.blocks[0].attn.operator.dual_map).kind == kind
    assert manifest["source"]["checkpoint_sha256"] == "ab" * 32
    assert manifest["weights"]["sha256"] == sha256_file(out / WEIGHTS_FILE)
    assert manifest["options"]["layers"] == [0] and manifest["run_config"]["data"]["dataset"] == "toy"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def _edit_manifest(out, edit):
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    edit(manifest)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_missing_files_are_refused(artifact):
    out, _ = artifact
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="model.safetensors: file not found"):
        load_compiled(out)
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="manifest.json: file not found"):
        load_compiled(out)


def test_corrupted_or_truncated_weights_are_refused(artifact):
    out, _ = artifact
    weights = out / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_compiled(out)
    # A truncated file whose hash was (wrongly) re-recorded is still refused by the safetensors reader.
    weights.write_bytes(bytes(data[: len(data) // 2]))
    _edit_manifest(out, lambda m: m["weights"].update(sha256=sha256_file(weights)))
    with pytest.raises(ArtifactError, match="corrupted or not a safetensors file"):
        load_compiled(out)


def test_manifest_that_does_not_describe_the_weights_is_refused(artifact):
    out, _ = artifact
    _edit_manifest(out, lambda m: m["compiled_layers"][0]["slices"].update(num=7))
    with pytest.raises(ArtifactError, match="shape/dtype mismatches.*dual_map"):
        load_compiled(out)
    _edit_manifest(out, lambda m: (m["compiled_layers"][0]["slices"].update(num=5), m["model_config"].update(depth=3)))
    with pytest.raises(ArtifactError, match="missing keys"):
        load_compiled(out)
    rename = lambda m: m["compiled_layers"][0].update(name="blocks.5.attn.operator")  # noqa: E731
    _edit_manifest(out, lambda m: (m["model_config"].update(depth=2), rename(m)))
    with pytest.raises(ArtifactError, match="does not exist in the model"):
        load_compiled(out)
    _edit_manifest(out, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_compiled(out)
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_compiled(out)


def test_only_fitted_asap_models_are_saved(tmp_path, teacher):
    with pytest.raises(ArtifactError, match="no serialisable .config"):
        save_compiled(tmp_path, torch.nn.Sequential(AsapOperator(num_heads=1, head_dim=2)), report={})
