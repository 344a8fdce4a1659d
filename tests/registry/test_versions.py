"""Lines and versions on a real sqlite MLflow store: register, materialise, lineage, bad cases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editing.errors import (
    ArtifactMissingError,
    FingerprintMismatchError,
    ImmutableVersionError,
    IntegrityError,
    MissingParentError,
    StaleParentError,
    VersionNotFoundError,
)
from editing.models import load as load_model
from registry_helpers import random_delta


def _weights(model, names):
    from editing.delta import _module_name

    return {n: model.get_submodule(_module_name(n)).weight.detach().clone() for n in names}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_line_versions_materialise_to_base_plus_deltas(reg, line_name, model_dirs, arch):
    base_dir = model_dirs[arch]
    v1 = reg.ensure_line(line_name, base_dir, probes=[{"prompt": "the capital of france is", "target": "paris"}])
    assert (v1.number, v1.kind, v1.parent) == (1, "base", None)
    assert reg.ensure_line(line_name, base_dir).number == 1  # idempotent
    d2 = random_delta(base_dir, layers=(0,), seed=2, request_ids=["a", "b"])
    d3 = random_delta(base_dir, layers=(0, 1), seed=3, request_ids=["c"])
    v2 = reg.register_version(line_name, 1, d2, gate_report={"passed": True, "efficacy": 1.0})
    v3 = reg.register_version(line_name, v2, d3, gate_report={"passed": False})
    assert (v2.number, v2.parent, v3.number, v3.parent) == (2, 1, 3, 2)
    assert v3.editor == "random" and v3.hyperparameters == {"rank": 2, "seed": 3}
    assert set(v3.artifact_sha256) >= {"delta.safetensors", "request_ids.json", "gate_report.json"}
    assert reg.latest(line_name).number == 3
    assert [v.number for v in reg.chain(f"models:/{line_name}/3")] == [1, 2, 3]
    assert reg.applied_request_ids(line_name) == ["a", "b", "c"]
    assert reg.alias_version(line_name, "candidate") == 2  # v3's gates failed

    expected = load_model(base_dir).model
    d2.apply(expected)
    d3.apply(expected)
    names = sorted(set(d2.factors) | set(d3.factors))
    for ref in (f"models:/{line_name}/3", (line_name, 3), f"models:/{line_name}/latest"):
        m = reg.materialize(ref)
        got = _weights(m.model, names)
        want = _weights(expected, names)
        for n in names:
            torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)
    assert m.from_cache  # the second and third loads read the content-keyed cache
    cached = list((reg.cache_dir / "materialized").iterdir())
    assert cached and not [f.name for f in cached if f.name.endswith(".tmp")]  # no temporary file left behind
    model, tok = reg.load(f"models:/{line_name}@candidate")
    assert model.editops_version == f"models:/{line_name}/2"
    ids = tok("the capital of france is", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok)


def test_compare_and_set_and_immutability(reg, line_name, model_dirs):
    base = model_dirs["llama"]
    reg.ensure_line(line_name, base)
    d = random_delta(base, seed=5)
    v2 = reg.register_version(line_name, 1, d)
    with pytest.raises(ImmutableVersionError, match="already holds this delta"):
        reg.register_version(line_name, 1, d)
    with pytest.raises(StaleParentError, match="head is version 2, not 1"):
        reg.register_version(line_name, 1, random_delta(base, seed=6))
    with pytest.raises(MissingParentError):
        reg.register_version(line_name, 9, random_delta(base, seed=7))
    assert [v.number for v in reg.versions(line_name)] == [1, 2]
    assert reg.version(line_name, 2).tags == v2.tags  # nothing changed the registered version
    with pytest.raises(VersionNotFoundError):
        reg.resolve(f"models:/{line_name}/5")
    with pytest.raises(VersionNotFoundError):
        reg.resolve(f"models:/{line_name}@champion")


def test_delta_for_another_base_is_refused(reg, line_name, model_dirs, tmp_path):
    from registry_helpers import save_model_dir

    reg.ensure_line(line_name, model_dirs["llama"])
    other = save_model_dir(tmp_path / "other", "llama", seed=1)
    with pytest.raises(FingerprintMismatchError, match="computed for base"):
        reg.register_version(line_name, 1, random_delta(other))
    with pytest.raises(FingerprintMismatchError):
        reg.ensure_line(line_name, other)


def test_base_weights_changed_after_line_creation_is_refused(reg, line_name, model_dirs, tmp_path):
    import shutil

    from registry_helpers import save_model_dir

    base = tmp_path / "base"
    shutil.copytree(model_dirs["gpt2"], base)
    reg.ensure_line(line_name, base)
    reg.register_version(line_name, 1, random_delta(base))
    shutil.rmtree(base)
    save_model_dir(base, "gpt2", seed=3)  # same path, different weights
    with pytest.raises(FingerprintMismatchError, match="base weights changed"):
        reg.load(f"models:/{line_name}/2")


def _artifact_path(reg, version, name) -> Path:
    run = reg.client.get_run(version.run_id)
    return Path(run.info.artifact_uri.replace("file://", "")) / "version" / name


def test_tampered_and_missing_artifacts_are_refused(reg, line_name, model_dirs):
    base = model_dirs["gpt2"]
    reg.ensure_line(line_name, base)
    v2 = reg.register_version(line_name, 1, random_delta(base, seed=8))
    path = _artifact_path(reg, v2, "delta.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="modified after registration"):
        reg.load(f"models:/{line_name}/2", use_cache=False)
    path.unlink()
    with pytest.raises(ArtifactMissingError, match="missing from the artifact store"):
        reg.load(f"models:/{line_name}/2")


def test_cached_blob_is_rechecked(reg, line_name, model_dirs):
    base = model_dirs["gpt2"]
    reg.ensure_line(line_name, base)
    v2 = reg.register_version(line_name, 1, random_delta(base, seed=9))
    reg.load(v2.uri, use_cache=False)
    blob = reg.cache_dir / "blobs" / v2.artifact_sha256["delta.safetensors"]
    blob.write_bytes(b"garbage")  # a corrupted cache entry is dropped and fetched again
    m = reg.materialize(v2.uri, use_cache=False)
    assert blob.read_bytes() != b"garbage" and len(m.chain) == 2


def test_missing_parent_in_history_is_refused(reg, line_name, model_dirs):
    base = model_dirs["llama"]
    reg.ensure_line(line_name, base)
    reg.register_version(line_name, 1, random_delta(base, seed=10))
    reg.register_version(line_name, 2, random_delta(base, seed=11))
    reg.client.delete_model_version(line_name, "2")  # someone deleted a middle version behind editops' back
    with pytest.raises(MissingParentError, match="names parent 2, which is missing"):
        reg.load(f"models:/{line_name}/3")
    with pytest.raises(MissingParentError):
        reg.register_version(line_name, 2, random_delta(base, seed=12))


def test_editor_state_is_content_addressed(reg, line_name, model_dirs):
    from editing.editors.base import EditorState

    base = model_dirs["llama"]
    reg.ensure_line(line_name, base)
    state = EditorState("random", {"layer0::C": torch.eye(4)}, {"n_edits": 1})
    v2 = reg.register_version(line_name, 1, random_delta(base, seed=13), state=state)
    v3 = reg.register_version(line_name, 2, random_delta(base, seed=14), state=state)  # same state content
    assert v2.state_file and v2.state_file in v2.artifact_sha256 and v2.state_ref is None
    assert v3.state_ref == 2 and v3.state_file == v2.state_file and v3.state_file not in v3.artifact_sha256
    back = reg.load_state(v3.uri, editor="random")
    torch.testing.assert_close(back.tensors["layer0::C"], torch.eye(4))
    assert back.meta == {"n_edits": 1}
    assert reg.load_state(f"models:/{line_name}/1") is None


def test_storage_is_a_small_fraction_of_the_model(reg, line_name, model_dirs):
    base = model_dirs["llama"]
    reg.ensure_line(line_name, base)
    v2 = reg.register_version(line_name, 1, random_delta(base, layers=(0,), rank=1, request_ids=[f"r{i}" for i in range(10)]))
    delta_bytes = int(v2.tags["editops.delta_bytes"])
    model_bytes = sum(p.stat().st_size for p in Path(base).glob("*.safetensors"))
    assert delta_bytes < model_bytes  # the real 1 % bar is measured on the 135M model in bench/bench_registry.py
    assert json.loads(v2.tags["editops.request_ids"]) == [f"r{i}" for i in range(10)]


def test_hyperparameters_too_long_for_a_tag_are_left_out_of_it_and_kept_in_the_delta(reg, line_name, model_dirs):
    """A version whose hyperparameters do not fit MLflow's tag (a long ``relation_prompts``) is listed like any
    other: the tag keeps what fits and names what it left out; the delta holds the complete set. A tag an older
    editops cut mid-string reads as nothing kept instead of breaking every listing of the line."""
    from dataclasses import replace

    from registry import versions as V

    base_dir = model_dirs["gpt2"]
    reg.ensure_line(line_name, base_dir)
    d = random_delta(base_dir, layers=(0,), seed=2, request_ids=["a"])
    long = {f"The relation number {i} of {{}} is": f"P{i}" for i in range(200)}
    d = replace(d, hyperparameters={**d.hyperparameters, "relation_prompts": long})
    v = reg.register_version(line_name, 1, d)
    (listed,) = [x for x in reg.versions(line_name) if x.number == v.number]
    assert len(listed.tags[V.HPARAMS]) <= V.MAX_TAG_VALUE
    assert listed.hyperparameters == {"rank": 2, "seed": 2} and listed.hyperparameters_elided == ["relation_prompts"]
    assert reg.load_delta(listed).hyperparameters["relation_prompts"] == long
    short = {"rank": 2, "seed": 2}
    assert json.loads(V.hyperparameters_tag(short)) == short
    assert V._hyperparameters_of(json.dumps({"a": "x" * 10})[:8]) == ({}, ["*"])
