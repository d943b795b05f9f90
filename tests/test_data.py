import warnings

import numpy as np
import pytest
import torch

from meaning_transform.data import (
    ALIVE_THRESHOLD,
    DATA_KINDS,
    ENERGY,
    HAS_TARGET,
    HEALTH,
    N_FEATURES,
    POSITION,
    ROLE,
    THREAT_HEALTH,
    DataError,
    generate,
    load_data,
    synthetic_agent_states,
)

# --- synthetic agent states -------------------------------------------------------------


def test_synthetic_states_obey_layout():
    s = synthetic_agent_states(2000, seed=0)
    assert s.shape == (2000, N_FEATURES) and s.dtype == torch.float32
    for col in (s[:, POSITION], s[:, HEALTH], s[:, ENERGY]):
        assert ((col >= 0) & (col <= 1)).all()
    assert set(s[:, HAS_TARGET].unique().tolist()) == {0.0, 1.0}
    roles = s[:, ROLE]
    assert set(roles.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(roles.sum(dim=1), torch.ones(2000))
    assert (roles.sum(dim=0) > 0).all()  # every role occurs


def test_synthetic_states_have_dead_and_threatened_agents():
    s = synthetic_agent_states(2000, seed=0)
    dead = s[:, HEALTH] < ALIVE_THRESHOLD
    threatened = (s[:, HAS_TARGET] == 1) & (s[:, HEALTH] < THREAT_HEALTH)
    assert 0.05 < dead.float().mean() < 0.15
    assert 0.02 < threatened.float().mean() < 0.15
    assert (threatened & ~dead).any()  # living agents under threat, not only the dead
    assert 0.3 < s[:, HAS_TARGET].mean() < 0.5


def test_synthetic_states_deterministic_and_global_rng_untouched():
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    a, b = synthetic_agent_states(100, seed=4), synthetic_agent_states(100, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, synthetic_agent_states(100, seed=5))
    assert torch.equal(state, torch.get_rng_state())
    assert np.array_equal(np_state, np.random.get_state()[1])


# --- generate -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_generate_shape_dtype_determinism(kind):
    dim = 10 if kind == "agent_states" else 7
    a = generate(kind, 500, dim=dim, seed=1)
    assert a.shape == (500, dim) and a.dtype == torch.float32
    assert torch.equal(a, generate(kind, 500, dim=dim, seed=1))
    assert not torch.equal(a, generate(kind, 500, dim=dim, seed=2))


def test_generate_ranges():
    normal = generate("normal", 5000, dim=4)
    assert abs(float(normal.mean())) < 0.05 and abs(float(normal.std()) - 1) < 0.05
    assert (normal < 0).any()
    uniform = generate("uniform", 1000, dim=4)
    assert ((uniform >= 0) & (uniform < 1)).all() and 0.45 < uniform.mean() < 0.55
    binary = generate("binary", 1000, dim=4)
    assert set(binary.unique().tolist()) == {0.0, 1.0} and 0.45 < binary.mean() < 0.55
    one_hot = generate("one_hot", 1000, dim=6)
    assert torch.equal(one_hot.sum(dim=1), torch.ones(1000))
    assert (one_hot.sum(dim=0) > 0).all()


def test_generate_agent_states_matches_synthetic():
    assert torch.equal(generate("agent_states", 50, seed=3), synthetic_agent_states(50, seed=3))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("gaussian", 10), "gaussian"),
        (("normal", 0), "n must be"),
        (("normal", 10, 0), "dim must be"),
        (("agent_states", 10, 7), "dim must be 10"),
    ],
)
def test_generate_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        generate(*args)


# --- load_data: round trips ---------------------------------------------------------------


def test_load_npy_round_trip(tmp_path):
    data = np.random.default_rng(0).random((20, 10))
    np.save(tmp_path / "d.npy", data)
    loaded = load_data(tmp_path / "d.npy", expected_features=10)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, torch.from_numpy(data.astype(np.float32)))


def test_load_npy_int_and_bool_become_float32(tmp_path):
    np.save(tmp_path / "i.npy", np.arange(6, dtype=np.int64).reshape(3, 2))
    np.save(tmp_path / "b.npy", np.array([[True, False]]))
    assert torch.equal(load_data(tmp_path / "i.npy"), torch.arange(6.0).reshape(3, 2))
    assert torch.equal(load_data(tmp_path / "b.npy"), torch.tensor([[1.0, 0.0]]))


@pytest.mark.parametrize("header", [True, False])
def test_load_csv_round_trip(tmp_path, header):
    data = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    lines = ["x,y,health"] if header else []
    lines += [",".join(repr(float(v)) for v in row) for row in data]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    loaded = load_data(tmp_path / "d.csv")
    assert loaded.shape == (5, 3)
    assert torch.equal(loaded, torch.from_numpy(data))


def test_load_csv_from_savetxt_with_comment_header(tmp_path):
    data = np.arange(12.0).reshape(4, 3)
    np.savetxt(tmp_path / "d.csv", data, delimiter=",", header="a,b,c")
    assert torch.equal(load_data(tmp_path / "d.csv"), torch.from_numpy(data).float())


@pytest.mark.parametrize(
    "obj",
    [torch.ones(4, 3), {"data": torch.ones(4, 3), "meta": torch.zeros(1)}, {"x": torch.ones(4, 3)}],
    ids=["tensor", "dict-data-key", "dict-single-tensor"],
)
def test_load_pt_round_trip(tmp_path, obj):
    torch.save(obj, tmp_path / "d.pt")
    assert torch.equal(load_data(tmp_path / "d.pt"), torch.ones(4, 3))


def test_load_pt_int_tensor_becomes_float32(tmp_path):
    torch.save(torch.arange(4).reshape(2, 2), tmp_path / "d.pt")
    loaded = load_data(tmp_path / "d.pt")
    assert loaded.dtype == torch.float32 and loaded.tolist() == [[0, 1], [2, 3]]


# --- load_data: errors --------------------------------------------------------------------


def _single_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npy"
    with pytest.raises(DataError) as exc:
        load_data(path)
    assert _single_line(exc) == f"data file not found: {path}"


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.txt").write_text("1,2\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.npy, \.csv, \.pt"):
        load_data(tmp_path / "d.txt")


@pytest.mark.parametrize(
    ("shape", "shown"), [((5,), r"\(5,\)"), ((2, 3, 4), r"\(2, 3, 4\)"), ((), r"\(\)")]
)
def test_wrong_rank(tmp_path, shape, shown):
    np.save(tmp_path / "d.npy", np.zeros(shape))
    with pytest.raises(DataError, match=r"expected 2-D data \(N, D\), got shape " + shown):
        load_data(tmp_path / "d.npy")


def test_wrong_rank_pt(tmp_path):
    torch.save(torch.zeros(5), tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"expected 2-D data \(N, D\), got shape \(5,\)"):
        load_data(tmp_path / "d.pt")


def test_non_numeric_csv_names_line_and_column(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,c\n1,2,3\n4,oops,6\n")
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.csv")
    assert "non-numeric value 'oops' at line 3, column 2" in _single_line(exc)


def test_empty_cell_csv(tmp_path):
    (tmp_path / "d.csv").write_text("1,2,3\n4,,6\n")
    with pytest.raises(DataError, match="empty value at line 2, column 2"):
        load_data(tmp_path / "d.csv")


def test_ragged_csv(tmp_path):
    (tmp_path / "d.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(DataError, match="line 2 has 2 values, expected 3"):
        load_data(tmp_path / "d.csv")


def test_non_numeric_npy(tmp_path):
    np.save(tmp_path / "d.npy", np.array([["a", "b"]]))
    with pytest.raises(DataError, match="expected numeric data"):
        load_data(tmp_path / "d.npy")


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.csv", ""), ("header_only.csv", "x,y,z\n")],
)
def test_empty_csv(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="data is empty"):
        load_data(tmp_path / name)


def test_empty_npy(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((0, 10)))
    with pytest.raises(DataError, match=r"data is empty: shape \(0, 10\)"):
        load_data(tmp_path / "d.npy")


def test_nan_and_inf_reported_with_count_and_first_position(tmp_path):
    data = np.ones((4, 3))
    data[2, 1] = np.nan
    data[3, 0] = np.inf
    np.save(tmp_path / "d.npy", data)
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npy")
    assert "data contains 2 non-finite values, first at row 2, column 1" in _single_line(exc)


def test_nan_in_csv(tmp_path):
    (tmp_path / "d.csv").write_text("1,2\n3,nan\n")
    with pytest.raises(DataError, match="1 non-finite values, first at row 1, column 1"):
        load_data(tmp_path / "d.csv")


def test_float64_overflowing_float32(tmp_path):
    np.save(tmp_path / "d.npy", np.array([[1.0, 1e300]]))
    with pytest.raises(DataError, match="too large for float32"):
        load_data(tmp_path / "d.npy")


def test_wrong_feature_count(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((3, 7)))
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npy", expected_features=10)
    assert "expected 10 features per row, got 7" in _single_line(exc)


@pytest.mark.parametrize(
    ("name", "content"),
    [("d.npy", b"not an npy file"), ("d.pt", b"garbage bytes"), ("d.csv", b"\xff\xfe\x00bad")],
)
def test_corrupt_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match="cannot read") as exc:
        load_data(tmp_path / name)
    _single_line(exc)


def test_pickled_npy_refused(tmp_path):
    np.save(tmp_path / "d.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot read as .npy"):
        load_data(tmp_path / "d.npy")


def test_pt_dict_without_data(tmp_path):
    torch.save({"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"got a dict with keys \['a', 'b'\]"):
        load_data(tmp_path / "d.pt")


def test_bad_expected_features_is_a_programming_error(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="expected_features") as exc:
        load_data(tmp_path / "d.npy", expected_features=0)
    assert not isinstance(exc.value, DataError)


class _NotATensor:
    pass


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: torch.empty(3, 10, device="meta"), r"no values \(device 'meta'\)"),
        (lambda: torch.zeros(3, 10, dtype=torch.complex64), "complex values"),
        (lambda: "a string", "expected a tensor, got str"),
        (lambda: {"weights": [1, 2]}, "got a dict with keys \\['weights'\\]"),
        (lambda: [torch.zeros(3, 10)], "expected a tensor, got list"),
        (lambda: torch.nested.nested_tensor([torch.zeros(3), torch.zeros(4)]), "nested"),
        (_NotATensor, "Python objects"),
    ],
)
def test_pt_that_does_not_hold_numbers_is_one_line(tmp_path, make, words):
    path = tmp_path / "d.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        torch.save(make(), path)
    with pytest.raises(DataError, match=words) as exc:
        load_data(path)
    _single_line(exc)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.bool])
def test_pt_narrow_floats_and_bools_become_float32(tmp_path, dtype):
    values = torch.tensor([[0.5, 1.0], [0.0, 0.25]]).to(dtype)
    torch.save(values, tmp_path / "d.pt")
    loaded = load_data(tmp_path / "d.pt")
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, values.to(torch.float32))


def test_pt_float8_and_sparse_are_read(tmp_path):
    values = torch.tensor([[0.5, 1.0], [0.0, 2.0]])
    for name, stored in (("f8.pt", values.to(torch.float8_e4m3fn)), ("sp.pt", values.to_sparse())):
        torch.save(stored, tmp_path / name)
        assert torch.equal(load_data(tmp_path / name), values)


def test_data_paths_the_os_refuses_are_one_line(tmp_path):
    with pytest.raises(DataError, match="too long for the file system") as exc:
        load_data(tmp_path / ("a" * 300 + ".npy"))
    _single_line(exc)
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "file.txt" / "d.npy")  # a parent that is a file
    with pytest.raises(DataError, match="cannot be used"):
        load_data("d\x00.npy")
