"""The agent-state layout, synthetic data, and loading a user's data files.

Layout of one agent state (D = 10 features):

    index 0, 1  x, y        position, normalised to [0, 1]
    index 2     health      [0, 1] (x100 = hit points)
    index 3     has_target  0 or 1
    index 4     energy      [0, 1]
    index 5-9   role        one-hot over 5 roles
"""

from __future__ import annotations

import csv
import errno
import io
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

# Generic generators of the original extended experiment, plus the agent-state layout;
# kept in constants so that ``mtx --help`` can list them without importing torch.
from meaning_transform.constants import DATA_KINDS

N_FEATURES = 10
N_ROLES = 5
FEATURE_NAMES: tuple[str, ...] = (
    "x",
    "y",
    "health",
    "has_target",
    "energy",
    "role_0",
    "role_1",
    "role_2",
    "role_3",
    "role_4",
)
POSITION = slice(0, 2)
HEALTH = 2
HAS_TARGET = 3
ENERGY = 4
ROLE = slice(5, 10)

ALIVE_THRESHOLD = 0.1  # is_alive := health > 0.1
THREAT_HEALTH = 0.3  # threatened := has_target and health < 0.3

# Semantic features derived from the layout, in reporting order.
SEMANTIC_FEATURES: tuple[str, ...] = (
    "position",
    "health",
    "has_target",
    "energy",
    "is_alive",
    "role",
    "threatened",
)

# Synthetic agent states: shares and shapes chosen to look like a running simulation.
DEAD_FRACTION = 0.1  # share of agents with health < ALIVE_THRESHOLD
TARGET_FRACTION = 0.4  # share of agents with has_target == 1
ALIVE_HEALTH_BETA = (2.0, 1.5)  # living health = 0.1 + 0.9 * Beta(a, b): mean ~0.61
ENERGY_BETA = (2.0, 2.0)  # energy ~ Beta(a, b): mean 0.5, rarely at the extremes

SUPPORTED_SUFFIXES: tuple[str, ...] = (".npy", ".csv", ".pt")


class DataError(ValueError):
    """The user's data cannot be used; the message is one line saying why and where."""


def synthetic_agent_states(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` plausible agent states laid out as in the module docstring, shape ``(n, 10)``.

    Position and roles are uniform; about 10% of agents are dead (health < 0.1), the
    living have health ``0.1 + 0.9 * Beta(2, 1.5)``; about 40% have a target, so roughly
    7% are threatened (has_target and health < 0.3); energy is ``Beta(2, 2)``. Drawn from
    a local ``numpy.random.Generator`` seeded by ``seed``: same seed, same tensor, and the
    global RNGs are untouched.
    """
    _check_n_seed(n, seed)
    rng = np.random.default_rng(seed)
    states = np.zeros((n, N_FEATURES), dtype=np.float64)
    states[:, POSITION] = rng.uniform(0.0, 1.0, size=(n, 2))
    dead = rng.uniform(size=n) < DEAD_FRACTION
    alive_health = ALIVE_THRESHOLD + (1.0 - ALIVE_THRESHOLD) * rng.beta(*ALIVE_HEALTH_BETA, n)
    dead_health = rng.uniform(0.0, ALIVE_THRESHOLD, size=n)
    states[:, HEALTH] = np.where(dead, dead_health, alive_health)
    states[:, HAS_TARGET] = rng.uniform(size=n) < TARGET_FRACTION
    states[:, ENERGY] = rng.beta(*ENERGY_BETA, n)
    states[np.arange(n), ROLE.start + rng.integers(0, N_ROLES, size=n)] = 1.0
    return torch.from_numpy(states.astype(np.float32))


def generate(kind: str, n: int, dim: int = N_FEATURES, seed: int = 0) -> torch.Tensor:
    """``n`` samples of ``dim`` features, float32 ``(n, dim)``, reproducible from ``seed``.

    Kinds: ``agent_states`` (see :func:`synthetic_agent_states`; ``dim`` must be 10),
    ``normal`` (standard normal), ``uniform`` ([0, 1)), ``binary`` (Bernoulli(0.5) 0/1),
    ``one_hot`` (one-hot over ``dim`` uniformly chosen classes).
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"kind must be one of {DATA_KINDS}, got {kind!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    _check_n_seed(n, seed)
    if kind == "agent_states":
        if dim != N_FEATURES:
            raise ValueError(f"dim must be {N_FEATURES} for kind 'agent_states', got {dim}")
        return synthetic_agent_states(n, seed)
    rng = np.random.default_rng(seed)
    values: npt.NDArray[np.float64] | npt.NDArray[np.int64]  # binary draws integers
    if kind == "normal":
        values = rng.standard_normal((n, dim))
    elif kind == "uniform":
        values = rng.uniform(0.0, 1.0, size=(n, dim))
    elif kind == "binary":
        values = rng.integers(0, 2, size=(n, dim))
    else:  # one_hot
        values = np.eye(dim)[rng.integers(0, dim, size=n)]
    return torch.from_numpy(values.astype(np.float32))


def load_data(path: str | Path, expected_features: int | None = None) -> torch.Tensor:
    """Read a 2-D numeric data file into a float32 tensor ``(N, D)``.

    Formats, chosen by suffix (case-insensitive):

    * ``.npy`` -- ``numpy.load(allow_pickle=False)``.
    * ``.csv`` -- comma-separated numbers, one sample per line. The first row is a header
      when none of its cells is a number (so a header of numeric names such as pandas'
      ``0,1,2,...`` cannot be told from data and is read as a row). Blank lines and lines
      starting with ``#`` (``numpy.savetxt`` headers) are skipped.
    * ``.pt`` -- ``torch.load(weights_only=True)`` of a tensor, or of a dict holding one
      tensor or a tensor under the key ``"data"``.

    Bool and integer data are converted to float32.

    Raises:
        DataError: one line naming the file and the problem -- missing file, unsupported
            suffix, unreadable file, non-numeric content (with line and column for CSV),
            not 2-D, empty, NaN/Inf (count and first position, 0-based row and column),
            or a feature count other than ``expected_features``.
        ValueError: ``expected_features`` is given and is not an integer >= 1.
    """
    if expected_features is not None and (
        isinstance(expected_features, bool)
        or not isinstance(expected_features, int)
        or expected_features < 1
    ):
        raise ValueError(f"expected_features must be an integer >= 1, got {expected_features!r}")
    path = Path(path)
    _check_is_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = _read_npy(path)
    elif suffix == ".csv":
        data = _read_csv(path)
    elif suffix == ".pt":
        data = _read_pt(path)
    else:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported: {supported}"
        )
    return _validated(data, path, expected_features)


def _check_is_file(path: Path) -> None:
    """Refuse a path that is not a readable regular file, in one line (never an OSError)."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"data file not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            text = str(path)
            shown = text if len(text) <= 60 else f"{text[:40]}...{text[-16:]}"
            raise DataError(f"data path too long for the file system: {shown}") from None
        raise DataError(f"{path}: cannot open: {exc.strerror or _one_line(exc)}") from None
    except ValueError as exc:  # an embedded NUL byte
        raise DataError(f"data path cannot be used: {_one_line(exc)}") from None
    if not stat.S_ISREG(found.st_mode):
        raise DataError(f"data path is not a file: {path}")


def _check_n_seed(n: int, seed: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _read_npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # corrupt, truncated, or pickled objects
        raise DataError(f"{path}: cannot read as .npy: {_one_line(exc)}") from exc
    if not isinstance(array, np.ndarray):  # np.load returns NpzFile for zip archives
        raise DataError(f"{path}: cannot read as .npy: not a single array")
    kind = array.dtype.kind
    if kind == "c":
        raise DataError(f"{path}: complex values are not supported (dtype {array.dtype})")
    if kind not in "biuf":
        raise DataError(f"{path}: expected numeric data, got dtype {array.dtype}")
    if kind == "f":
        # torch.from_numpy needs native byte order and at most float64.
        target = np.float64 if array.dtype.itemsize > 8 else array.dtype.newbyteorder("=")
    else:
        target = np.float32  # bool/int: exact enough, never non-finite
    return torch.from_numpy(np.asarray(array, dtype=target, order="C"))


def _read_csv(path: Path) -> torch.Tensor:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text: {_one_line(exc)}") from exc
    rows: list[list[float]] = []
    width: int | None = None  # cells per row, fixed by the first row (header or data)
    try:
        records = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise DataError(f"{path}: cannot parse as CSV: {_one_line(exc)}") from exc
    for line, cells in enumerate(records, start=1):
        cells = [c.strip() for c in cells]
        if (len(cells) <= 1 and not any(cells)) or cells[0].startswith("#"):
            continue  # blank line or comment
        if width is None:
            width = len(cells)
            if not any(_is_number(c) for c in cells):
                continue  # header
        if len(cells) != width:
            raise DataError(f"{path}: line {line} has {len(cells)} values, expected {width}")
        rows.append([_parse_cell(c, path, line, col) for col, c in enumerate(cells, start=1)])
    if not rows:
        return torch.empty((0, width or 0), dtype=torch.float64)
    return torch.tensor(rows, dtype=torch.float64)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _parse_cell(cell: str, path: Path, line: int, col: int) -> float:
    try:
        return float(cell)
    except ValueError:
        what = "empty value" if not cell else f"non-numeric value {cell[:40]!r}"
        raise DataError(f"{path}: {what} at line {line}, column {col}") from None


def _read_pt(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses arbitrary Python objects
        raise DataError(
            f"{path}: cannot read as .pt: it holds Python objects that "
            "torch.load(weights_only=True) does not unpickle; save a tensor, "
            "torch.save(tensor, path)"
        ) from exc
    except Exception as exc:  # torch.load raises many types for corrupt or unsafe files
        raise DataError(f"{path}: cannot read as .pt: {_one_line(exc)}") from exc
    if isinstance(obj, dict):
        if isinstance(obj.get("data"), torch.Tensor):
            obj = obj["data"]
        elif len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
            obj = next(iter(obj.values()))
        else:
            keys = ", ".join(repr(k) for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
            raise DataError(
                f"{path}: expected a tensor, or a dict with one tensor or a tensor under "
                f"'data'; got a dict with keys [{keys}]"
            )
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path}: expected a tensor, got {type(obj).__name__}")
    return _numeric_tensor(obj.detach(), path)


def _numeric_tensor(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    """A dense CPU tensor of plain numbers: float64 stays, other floats, ints and bools
    become float32 (exact for the floats narrower than 32 bits)."""
    if tensor.is_complex():
        raise DataError(f"{path}: complex values are not supported (dtype {tensor.dtype})")
    if tensor.device.type == "meta":
        raise DataError(f"{path}: the tensor holds no values (device 'meta'), only a shape")
    if tensor.is_nested:
        raise DataError(f"{path}: a nested tensor (rows of different lengths) is not 2-D data")
    try:
        if tensor.is_quantized:
            tensor = tensor.dequantize()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        if tensor.dtype == torch.float64:
            return tensor
        return tensor.to(torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        raise DataError(
            f"{path}: cannot read the tensor (dtype {tensor.dtype}, layout {tensor.layout}) "
            f"as numbers: {_one_line(exc)}"
        ) from exc


def _validated(data: torch.Tensor, path: Path, expected_features: int | None) -> torch.Tensor:
    """Shape and finiteness checks shared by every format; returns float32 ``(N, D)``."""
    shape = tuple(data.shape)
    if data.dim() != 2:
        raise DataError(f"{path}: expected 2-D data (N, D), got shape {shape}")
    if data.numel() == 0:
        raise DataError(f"{path}: data is empty: shape {shape}, need at least 1 row and 1 column")
    if expected_features is not None and shape[1] != expected_features:
        raise DataError(f"{path}: expected {expected_features} features per row, got {shape[1]}")
    _check_finite(data, path, "data contains {count} non-finite values")
    result = data.to(torch.float32).contiguous()
    _check_finite(result, path, "data has {count} values too large for float32")
    return result


def _check_finite(data: torch.Tensor, path: Path, template: str) -> None:
    bad = ~torch.isfinite(data)  # (N, D)
    count = int(bad.sum())
    if count:
        row, col = (int(i) for i in bad.nonzero()[0])
        raise DataError(
            f"{path}: {template.format(count=count)}, first at row {row}, column {col} (0-based)"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
