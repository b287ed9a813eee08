"""Persona-vector files: round trip with metadata, refusal on another model, the reference
implementation's `.pt` files read without torch, and clear errors for malformed input.

Everything goes through real files in `tmp_path`; torch only writes the `.pt` inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import numpy as np
import pytest
import torch

import pvjax
from pvjax.files.vectors import (
    FORMAT,
    KEYS,
    LAYER_CONVENTION,
    VectorError,
    import_reference,
    load_vectors,
    read_vector,
    save_vectors,
)

L, D = 31, 576


def rand_vectors(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((L, D)).astype(np.float32) for k in KEYS}


def other_model(model, **config_changes):
    """The same weights under a changed config: enough for the checks, which read only the
    config."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, **config_changes))


@pytest.fixture
def vector_file(tmp_path, smollm2):
    vectors = rand_vectors()
    path = save_vectors(
        tmp_path / "evil" / "vectors.safetensors", vectors, model=smollm2, trait="evil"
    )
    return path, vectors


# --- pvjax files -------------------------------------------------------------------------------


def test_round_trip_keys_and_metadata(tmp_path, smollm2):
    vectors = rand_vectors()
    extra = {"n_kept": {"pos": 12, "neg": 9}, "threshold": 50, "judge": "local"}
    out = tmp_path / "sub" / "evil.safetensors"
    path = save_vectors(out, vectors, model=smollm2, trait="evil", extra=extra)
    assert path == out and out.is_file()
    assert not list(out.parent.glob("*.tmp")), "the temp file of the atomic write was left behind"
    assert [p.name for p in out.parent.iterdir()] == ["evil.safetensors"]

    tensors, meta = load_vectors(out, smollm2)
    assert sorted(tensors) == sorted(KEYS)
    for k in KEYS:
        assert tensors[k].dtype == np.float32 and tensors[k].shape == (L, D)
        np.testing.assert_array_equal(tensors[k], vectors[k])
    assert meta["format"] == FORMAT
    assert meta["model_id"] == smollm2.model_id == "smollm2-135m-instruct"
    assert meta["model_fingerprint"] == smollm2.config.fingerprint()
    assert (
        meta["layer_convention"] == LAYER_CONVENTION
        and "hidden_states[l]" in meta["layer_convention"]
    )
    assert meta["trait"] == "evil"
    assert meta["pvjax_version"] == pvjax.__version__
    assert meta["n_layers"] == "30" and meta["hidden_size"] == "576"
    # extra fields: non-strings JSON-encoded (safetensors metadata is str -> str), strings as is
    assert json.loads(meta["n_kept"]) == {"pos": 12, "neg": 9}
    assert json.loads(meta["threshold"]) == 50
    assert meta["judge"] == "local"
    # read_vector defaults to response_avg_diff
    np.testing.assert_array_equal(read_vector(str(out), smollm2), vectors["response_avg_diff"])


def test_save_overwrites_atomically(tmp_path, smollm2):
    out = tmp_path / "v.safetensors"
    save_vectors(out, rand_vectors(0), model=smollm2)
    second = rand_vectors(1)
    save_vectors(out, second, model=smollm2)
    np.testing.assert_array_equal(load_vectors(out)[0][KEYS[1]], second[KEYS[1]])
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_file_mode_follows_umask(tmp_path, smollm2):
    """The temp file of the atomic write is 0600; the vector file must not stay that private."""
    old = os.umask(0o022)
    try:
        out = save_vectors(tmp_path / "v.safetensors", rand_vectors(), model=smollm2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_extra_cannot_replace_reserved_metadata(tmp_path, smollm2):
    for key in ("model_fingerprint", "model_id", "format", "trait"):
        with pytest.raises(VectorError, match=key):
            save_vectors(
                tmp_path / "v.safetensors", rand_vectors(), model=smollm2, extra={key: "x"}
            )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(L - 1, D), (L, D + 1), (D,), (1, L, D)])
def test_save_wrong_shape(tmp_path, smollm2, shape):
    vectors = rand_vectors()
    vectors["prompt_avg_diff"] = np.zeros(shape, np.float32)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(VectorError, match=r"prompt_avg_diff.*\[31, 576\]"):
        save_vectors(out, vectors, model=smollm2)
    assert list(tmp_path.iterdir()) == [], "a refused save left a file behind"


def test_refuses_other_model_shape(vector_file, smollm2):
    path, _ = vector_file
    tiny = other_model(smollm2, num_layers=2, name="tiny-llama-2l")
    assert tiny.config.fingerprint() != smollm2.config.fingerprint()
    with pytest.raises(VectorError) as e:
        load_vectors(path, tiny)
    msg = str(e.value)
    assert "smollm2-135m-instruct" in msg and "tiny-llama-2l" in msg
    assert "30 layers" in msg and "2 layers" in msg
    with pytest.raises(VectorError, match="tiny-llama-2l"):
        read_vector(f"{path}:prompt_last_diff", tiny)
    # without a model nothing is checked
    tensors, meta = load_vectors(path)
    assert sorted(tensors) == sorted(KEYS) and meta["model_id"] == "smollm2-135m-instruct"


def test_same_shape_other_model_id_warns(vector_file, smollm2):
    path, vectors = vector_file
    finetune = other_model(smollm2, name="smollm2-135m-evil-finetune")
    assert finetune.config.fingerprint() == smollm2.config.fingerprint()
    with pytest.warns(UserWarning, match="smollm2-135m-evil-finetune"):
        tensors, _ = load_vectors(path, finetune)
    np.testing.assert_array_equal(tensors["response_avg_diff"], vectors["response_avg_diff"])
    with pytest.raises(VectorError, match="smollm2-135m-evil-finetune"):
        load_vectors(path, finetune, strict=True)
    with pytest.raises(VectorError, match="same shape"):
        read_vector(str(path), finetune, strict=True)


def test_read_vector_selects_key(vector_file, smollm2):
    path, vectors = vector_file
    for key in KEYS:
        np.testing.assert_array_equal(read_vector(f"{path}:{key}", smollm2), vectors[key])


def test_read_vector_unknown_key_lists_keys(vector_file, smollm2):
    path, _ = vector_file
    with pytest.raises(VectorError, match="'response_last_diff'") as e:
        read_vector(f"{path}:response_last_diff", smollm2)
    for key in KEYS:
        assert key in str(e.value)


def test_read_vector_rejects_nan(tmp_path, smollm2):
    vectors = rand_vectors()
    vectors["prompt_last_diff"][7, 3] = np.nan
    path = save_vectors(tmp_path / "nan.safetensors", vectors, model=smollm2)
    assert read_vector(str(path), smollm2).shape == (L, D)  # the other keys are fine
    with pytest.raises(VectorError, match="NaN"):
        read_vector(f"{path}:prompt_last_diff", smollm2)
    inf = torch.zeros(L, D)
    inf[3, 0] = float("inf")
    torch.save(inf, tmp_path / "inf.pt")
    with pytest.raises(VectorError, match="infinite"):
        read_vector(str(tmp_path / "inf.pt"), smollm2)


def test_corrupt_and_missing_files(tmp_path, smollm2):
    junk = np.random.default_rng(0).bytes(4096)
    (tmp_path / "junk.safetensors").write_bytes(junk)
    with pytest.raises(VectorError, match="junk.safetensors"):
        read_vector(str(tmp_path / "junk.safetensors"), smollm2)
    (tmp_path / "junk.pt").write_bytes(junk)
    with pytest.raises(VectorError, match="junk.pt"):
        read_vector(str(tmp_path / "junk.pt"), smollm2)
    # a truncated real file
    good = save_vectors(tmp_path / "good.safetensors", rand_vectors(), model=smollm2)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(VectorError, match="cut.safetensors"):
        load_vectors(tmp_path / "cut.safetensors", smollm2)
    for spec in (
        tmp_path / "missing.safetensors",
        f"{tmp_path / 'missing.safetensors'}:prompt_avg_diff",
        tmp_path / "missing.pt",
    ):
        with pytest.raises(VectorError, match="does not exist"):
            read_vector(str(spec), smollm2)


# --- the reference implementation's .pt files -------------------------------------------------


def test_pt_float32_exact(tmp_path, smollm2):
    t = torch.randn(L, D)
    torch.save(t, tmp_path / "evil_response_avg_diff.pt")
    v = read_vector(str(tmp_path / "evil_response_avg_diff.pt"), smollm2)
    assert v.dtype == np.float32 and v.shape == (L, D)
    np.testing.assert_array_equal(v, t.numpy())
    tensors, meta = load_vectors(tmp_path / "evil_response_avg_diff.pt", smollm2)
    assert list(tensors) == ["vector"] and meta == {}
    np.testing.assert_array_equal(
        read_vector(f"{tmp_path / 'evil_response_avg_diff.pt'}:vector"), t.numpy()
    )


def test_pt_bfloat16_and_float16(tmp_path, smollm2):
    for dtype in (torch.bfloat16, torch.float16):
        t = torch.randn(L, D).to(dtype)
        path = tmp_path / f"{str(dtype).split('.')[-1]}.pt"
        torch.save(t, path)
        v = read_vector(str(path), smollm2)
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, t.float().numpy())


def test_pt_non_contiguous(tmp_path, smollm2):
    base = torch.randn(D + 30, L + 9)
    t = base.T[4 : 4 + L, 10 : 10 + D]  # transposed slice: strides (1, L+9), nonzero storage offset
    assert not t.is_contiguous() and t.storage_offset() > 0 and t.shape == (L, D)
    torch.save(t, tmp_path / "view.pt")
    np.testing.assert_array_equal(read_vector(str(tmp_path / "view.pt"), smollm2), t.numpy())
    # a row slice of a larger tensor keeps the whole storage in the file
    torch.save(base.T[4 : 4 + L, :D].contiguous()[1:], tmp_path / "rows.pt")
    with pytest.raises(VectorError, match="n_layers\\+1 = 31"):
        read_vector(str(tmp_path / "rows.pt"), smollm2)


def test_pt_one_dimensional(tmp_path, smollm2):
    t = torch.randn(D)
    torch.save(t, tmp_path / "dir.pt")
    v = read_vector(str(tmp_path / "dir.pt"), smollm2)
    assert v.shape == (D,)
    np.testing.assert_array_equal(v, t.numpy())


def test_pt_wrong_width(tmp_path, smollm2):
    torch.save(torch.randn(L, 100), tmp_path / "narrow.pt")
    with pytest.raises(VectorError, match="width 100") as e:
        read_vector(str(tmp_path / "narrow.pt"), smollm2)
    assert "576" in str(e.value)
    torch.save(torch.randn(100), tmp_path / "narrow1d.pt")
    with pytest.raises(VectorError, match="width 100"):
        read_vector(str(tmp_path / "narrow1d.pt"), smollm2)


def test_pt_wrong_rows(tmp_path, smollm2):
    torch.save(torch.randn(12, D), tmp_path / "short.pt")
    with pytest.raises(VectorError, match=r"12 rows.*n_layers\+1 = 31"):
        read_vector(str(tmp_path / "short.pt"), smollm2)


def test_pt_rejects_non_tensor_pickles(tmp_path, smollm2):
    torch.save({"a": torch.randn(D), "b": torch.randn(D)}, tmp_path / "two.pt")
    with pytest.raises(VectorError, match="one tensor"):
        read_vector(str(tmp_path / "two.pt"), smollm2)
    torch.save({"only": torch.randn(L, D)}, tmp_path / "one.pt")  # a one-entry dict is unwrapped
    assert read_vector(str(tmp_path / "one.pt"), smollm2).shape == (L, D)


def test_import_reference(tmp_path, smollm2):
    ref = tmp_path / "persona_vectors" / "smollm2"
    ref.mkdir(parents=True)
    originals = {k: torch.randn(L, D) for k in KEYS}
    for k, t in originals.items():
        torch.save(t, ref / f"evil_{k}.pt")
    out = tmp_path / "evil.safetensors"
    assert import_reference(ref, "evil", smollm2, out) == out
    tensors, meta = load_vectors(out, smollm2, strict=True)
    assert sorted(tensors) == sorted(KEYS)
    for k in KEYS:
        np.testing.assert_array_equal(tensors[k], originals[k].numpy())
        np.testing.assert_array_equal(read_vector(f"{out}:{k}", smollm2), originals[k].numpy())
    assert meta["trait"] == "evil" and meta["format"] == FORMAT
    assert meta["imported_from"] == str(ref)
    assert meta["model_fingerprint"] == smollm2.config.fingerprint()


def test_import_reference_checks_each_file(tmp_path, smollm2):
    for k in KEYS:
        torch.save(torch.randn(L, D), tmp_path / f"evil_{k}.pt")
    torch.save(torch.randn(L, 100), tmp_path / "evil_prompt_last_diff.pt")
    with pytest.raises(VectorError, match="evil_prompt_last_diff.pt.*width 100"):
        import_reference(tmp_path, "evil", smollm2, tmp_path / "out.safetensors")
    (tmp_path / "evil_prompt_last_diff.pt").unlink()
    with pytest.raises(VectorError, match="evil_prompt_last_diff.pt does not exist"):
        import_reference(tmp_path, "evil", smollm2, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
