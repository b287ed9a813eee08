"""llama.cpp control vectors (`pvjax vectors export|import|show`): the GGUF read back with the
`gguf` package has llama.cpp's fields and pvjax row r as `direction.{r-1}`, bit for bit; a round
trip gives every exported row back; what cannot map or does not fit the model is one line and exit
status 2. Sizes are the embedded model's (30 layers, width 576), read from its GGUF metadata: no
weights load and nothing compiles. That llama.cpp's block r-1 then sees the same edit as pvjax's
row r is read from llama.cpp's source (`pvjax.files.control_vectors`) and checked by running
llama.cpp in tests/test_llamacpp_cvec.py (where llama-cpp-python is installed)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import pvjax
from pvjax import cli
from pvjax.files.control_vectors import LAYER_CONVENTION, read_control_vector
from pvjax.files.vectors import KEYS, load_vectors, save_vectors
from pvjax.loading import read_model_config
from pvjax.models.config import ModelConfig

EMBEDDED = "smollm2-135m-instruct"
N, D = 30, 576


@pytest.fixture(scope="module")
def model():
    cfg = read_model_config(EMBEDDED)
    assert (cfg.num_layers, cfg.hidden_size) == (N, D)
    return pvjax.Model(config=cfg, params=None, tokenizer=None, source=EMBEDDED)


@pytest.fixture(scope="module")
def vecs(model, tmp_path_factory):
    rng = np.random.default_rng(0)
    vectors = {k: rng.standard_normal((N + 1, D)).astype(np.float32) for k in KEYS}
    path = tmp_path_factory.mktemp("v") / "v.safetensors"
    save_vectors(path, vectors, model=model, trait="humorous")
    return path, vectors


def run(argv):
    return cli.main(["vectors", *map(str, argv)])


def user_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pvjax vectors: error: ") and "\n" not in err, err
    return err


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def write_cvec(path, directions: dict[int, np.ndarray], **meta):
    """A control vector as repeng's `export_gguf` writes one (uint32 layer_count)."""
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", len(directions))
    for k, v in meta.items():
        (w.add_int32 if isinstance(v, int) else w.add_string)(k, v)
    for n, d in directions.items():
        w.add_tensor(f"direction.{n}", d if d.dtype == np.float16 else np.asarray(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_export_has_llamacpp_fields_and_rows(vecs, tmp_path, capsys):
    path, vectors = vecs
    out = tmp_path / "a.gguf"
    assert run(["export", path, "--format", "gguf", "--out", out, "--model", EMBEDDED]) == 0
    assert "row 30 (after the final norm) left out, --layers 2-30" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    meta = fields(reader)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama"
    assert meta["controlvector.layer_count"] == N - 2
    assert meta["pvjax.layer_convention"] == LAYER_CONVENTION
    assert meta["pvjax.n_layers"] == N and meta["pvjax.coef"] == 1.0
    assert meta["pvjax.rows"] == "2-29"
    assert meta["pvjax.source"].endswith("v.safetensors:response_avg_diff")
    names = [t.name for t in reader.tensors]
    assert names == [f"direction.{n}" for n in range(1, N - 1)]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [D]
        n = int(t.name.split(".")[1])
        # llama.cpp's direction.n edits the output of its block n (from 0) = pvjax row n+1
        np.testing.assert_array_equal(bits(t.data), bits(vectors["response_avg_diff"][n + 1]))


def test_layers_and_coef_choose_and_scale_rows(vecs, tmp_path):
    path, vectors = vecs
    out = tmp_path / "b.gguf"
    run(["export", f"{path}:prompt_last_diff", "--out", out, "--layers", "20", "--coef", "-2.5"])
    (t,) = gguf.GGUFReader(out).tensors
    assert t.name == "direction.19"
    np.testing.assert_array_equal(bits(t.data), bits(np.float32(-2.5) * vectors[KEYS[2]][20]))
    meta = fields(gguf.GGUFReader(out))
    assert meta["pvjax.coef"] == -2.5 and meta["controlvector.layer_count"] == 1
    # without --model, the hint is the vector's own model id
    assert meta["controlvector.model_hint"] == EMBEDDED

    run(["export", path, "--out", out, "--layers", "25-30"])
    reader = gguf.GGUFReader(out)
    assert [t.name for t in reader.tensors] == [f"direction.{n}" for n in range(24, 30)]
    np.testing.assert_array_equal(bits(reader.tensors[-1].data), bits(vectors[KEYS[0]][N]))


def test_round_trip_gives_every_exported_row_back(vecs, model, tmp_path, capsys):
    path, vectors = vecs
    cv, back = tmp_path / "rt.gguf", tmp_path / "rt.safetensors"
    run(["export", f"{path}:prompt_avg_diff", "--out", cv, "--layers", "2-30"])
    assert run(["import", cv, "--model", EMBEDDED, "--out", back, "--key", "prompt_avg_diff"]) == 0
    assert "direction.1..direction.29 as pvjax rows 2..30" in capsys.readouterr().out
    tensors, meta = load_vectors(back, model)  # fits the model
    rows = tensors["prompt_avg_diff"]
    np.testing.assert_array_equal(bits(rows[2:]), bits(vectors["prompt_avg_diff"][2:]))
    assert not rows[:2].any()  # embeddings and row 1: no llama.cpp slot, zero
    assert meta["model_id"] == EMBEDDED and meta["imported_from"] == str(cv)


def test_repeng_style_file_imports(model, tmp_path):
    rng = np.random.default_rng(1)
    dirs = {n: rng.standard_normal(D).astype(np.float32) for n in (3, 10, 29)}
    src = write_cvec(tmp_path / "repeng.gguf", dirs)
    run(["import", src, "--model", EMBEDDED, "--out", tmp_path / "r.safetensors"])
    rows = load_vectors(tmp_path / "r.safetensors", model)[0]["response_avg_diff"]
    for n, d in dirs.items():
        np.testing.assert_array_equal(bits(rows[n + 1]), bits(d))
    assert not np.delete(rows, [4, 11, 30], axis=0).any()


def test_import_refuses_another_width_or_depth(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    narrow = write_cvec(tmp_path / "narrow.gguf", {1: np.ones(64)})
    err = user_error(["import", narrow, "--model", EMBEDDED, "--out", out], capsys)
    assert "width 64" in err and "hidden size 576" in err and EMBEDDED in err
    deep = write_cvec(tmp_path / "deep.gguf", {31: np.ones(D)})
    err = user_error(["import", deep, "--model", EMBEDDED, "--out", out], capsys)
    assert "direction.31" in err and "30 layers" in err
    declared = write_cvec(tmp_path / "decl.gguf", {5: np.ones(D)}, **{"pvjax.n_layers": 32})
    err = user_error(["import", declared, "--model", EMBEDDED, "--out", out], capsys)
    assert "32 layers" in err and "has 30" in err
    assert not out.exists()


def test_import_refuses_what_llamacpp_refuses(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    zero = write_cvec(tmp_path / "zero.gguf", {0: np.ones(D), 1: np.ones(D)})
    assert "direction.0" in user_error(["import", zero, "--model", EMBEDDED, "--out", out], capsys)
    half = write_cvec(tmp_path / "half.gguf", {2: np.ones(D, np.float16)})
    err = user_error(["import", half, "--model", EMBEDDED, "--out", out], capsys)
    assert "direction.2 is F16" in err and "1-D F32 only" in err
    w = gguf.GGUFWriter(str(tmp_path / "named.gguf"), "controlvector")
    w.add_tensor("steer.3", np.ones(D, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    err = user_error(["import", tmp_path / "named.gguf", "--model", EMBEDDED, "--out", out], capsys)
    assert "'steer.3' is not named direction.N" in err
    w = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    w.add_tensor("blk.0.attn_norm.weight", np.ones(D, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    err = user_error(["import", tmp_path / "model.gguf", "--model", EMBEDDED, "--out", out], capsys)
    assert "not a control vector" in err and "'llama'" in err
    (tmp_path / "junk.gguf").write_bytes(b"GGUF junk")
    err = user_error(["import", tmp_path / "junk.gguf", "--model", EMBEDDED, "--out", out], capsys)
    assert "not a readable GGUF" in err
    err = user_error(["import", tmp_path / "none.gguf", "--model", EMBEDDED, "--out", out], capsys)
    assert "does not exist" in err


@pytest.mark.parametrize(
    "layers, says",
    [
        ("0-3", "row 0 has no llama.cpp slot"),
        ("1", "would be direction.0"),
        ("5-31", "rows 0..30"),
        ("9-4", "above the last"),
        ("x", "expected A-B"),
    ],
)
def test_export_refuses_rows_that_cannot_map(vecs, tmp_path, capsys, layers, says):
    err = user_error(["export", vecs[0], "--out", tmp_path / "c.gguf", "--layers", layers], capsys)
    assert says in err
    assert not (tmp_path / "c.gguf").exists()


def test_export_refuses_bad_input(vecs, tmp_path, capsys):
    path, _ = vecs
    out = tmp_path / "c.gguf"
    assert "no tensor 'nokey'" in user_error(["export", f"{path}:nokey", "--out", out], capsys)
    other = ModelConfig(
        architecture="llama",
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        name="tiny",
    )
    tiny = pvjax.Model(config=other, params=None, tokenizer=None, source="tiny")
    small = save_vectors(
        tmp_path / "tiny.safetensors", {KEYS[0]: np.ones((5, 64), np.float32)}, model=tiny
    )
    err = user_error(["export", small, "--out", out, "--model", EMBEDDED], capsys)
    assert "tiny" in err and EMBEDDED in err and "width 576" in err
    err = user_error(["export", path, "--out", out, "--coef", "nan"], capsys)
    assert "not finite" in err
    assert not out.exists()


def test_show_lists_keys_and_directions(vecs, tmp_path, capsys):
    path, _ = vecs
    run(["show", path])
    text = capsys.readouterr().out
    assert "response_avg_diff: [31, 576] float32" in text and "model_id: " + EMBEDDED in text
    run(["export", path, "--out", tmp_path / "s.gguf", "--layers", "4-6"])
    capsys.readouterr()
    run(["show", tmp_path / "s.gguf"])
    assert (
        "3 directions of width 576: direction.3..direction.5 = pvjax rows 4..6"
        in capsys.readouterr().out
    )
    assert sorted(read_control_vector(tmp_path / "s.gguf").directions) == [3, 4, 5]
