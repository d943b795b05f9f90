"""The user's model output and loss, whatever their form -> named roles and terms.

Two edges, each crossed once:

- :func:`output_roles` maps what a model's ``forward`` returns (a dict with common
  aliases, a tuple or list in the common conventions, an object with attributes) to
  :class:`Roles`: ``reconstruction``, ``mu``, ``log_var`` and optional ``z``.
  Ambiguity is an :class:`OutputRolesError`, never a guess.
- :class:`UserLoss` calls the user's loss function with whatever it asks for (roles
  by parameter name, the model's output sequence as ``*args``, or ``(output, x)``)
  and turns what it returns (one scalar, a dict of terms, a tuple) into one
  :class:`LossResult`: the differentiable total, the live terms under the user's
  names, their weights, and how much of the total the weighted terms leave
  unexplained. :func:`measure_reductions` finds whether each term is summed or
  averaged over the batch by calling the loss on a batch and on that batch twice.

Shapes: B batch, D data features (``x`` is ``(B, D)``, or ``(B, C, H, W)`` for a
conv model fed ``shape_rows(x, input_shape)``), Z latent.

The order rule for a tuple or list output (``output_roles``), in full:

1. Every element must be a tensor.
2. The input echo: if the element at index 1 *is* ``x`` or equals it (compared
   row-flattened, so a flattened echo counts), it is the input passed back
   (AntixK/PyTorch-VAE's ``[recons, input, mu, log_var(, z)]``) and is set aside.
   Nowhere else is an element dropped for equalling ``x``: a reconstruction that
   equals the input is a fault to find, not an echo.
3. Three or four elements must remain.
4. The reconstruction is the first remaining element when that one is shaped like
   ``x`` (the convention of pytorch/examples and AntixK); otherwise the one
   remaining element shaped like ``x``, wherever it is; none or several -> error.
   "Shaped like x": the same shape as ``x``, or the same batch size and the same
   number of values per row with one of the two flat ``(B, D)``.
5. The other remaining elements, in the order returned, are ``mu``, ``log_var`` and
   (when there are three) ``z``: mu precedes log_var in every convention, and
   same-shaped latents cannot be told apart by shape, so their order is never
   inferred. ``mu`` and ``log_var`` must have the same shape, with batch size B.

So ``(recon, mu, logvar)``, ``[recons, input, mu, log_var]``, ``(recon, mu,
log_var, z)``, ``[recons, input, mu, log_var, z]`` and e.g. ``(mu, log_var,
recon)`` are read; ``(recon, z, mu, log_var)`` would be misread as ``mu=z`` (no
shape tells them apart) -- return a dict for that. When the latent size equals the
data size, every element is shaped like ``x`` and only the conventional order
(reconstruction first) is read.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NoReturn

import torch
from torch import Tensor, nn

# ---- model outputs -> roles ------------------------------------------------------

# Keys (or attribute names) a model output may use for each role, in no order of
# preference: two of them present at once is ambiguous.
ROLE_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "reconstruction": ("reconstruction", "recon", "recon_x", "x_hat", "recons", "x_recon"),
        "mu": ("mu", "mean", "z_mean"),
        "log_var": ("log_var", "logvar", "z_log_var"),
        "z": ("z",),
    }
)
REQUIRED_ROLES: tuple[str, ...] = ("reconstruction", "mu", "log_var")
_NAME_THE_ROLES = "return a dict with keys reconstruction, mu, log_var[, z]"
_MAX_LISTED = 8  # elements or entries described in an error line


class OutputRolesError(ValueError):
    """The model's output cannot be mapped to reconstruction, mu, log_var[, z]."""


class InputShapeError(ValueError):
    """An ``--input-shape`` text or a reshape by it is invalid."""


@dataclass(frozen=True)
class Roles:
    """A model output by role; each tensor is the very object the model returned.

    ``reconstruction`` keeps its returned shape: ``x``'s shape, or the row-flat
    ``(B, D)`` / image form of it (see the module docstring).
    """

    reconstruction: Tensor
    mu: Tensor  # (B, Z)
    log_var: Tensor  # (B, Z)
    z: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        """``{"reconstruction", "mu", "log_var"[, "z"]}``: what CombinedLoss takes."""
        out = {"reconstruction": self.reconstruction, "mu": self.mu, "log_var": self.log_var}
        if self.z is not None:
            out["z"] = self.z
        return out


def output_roles(output: object, x: Tensor) -> Roles:
    """Map a model's output to its roles; ``x`` is the batch the model was given.

    Accepts a Mapping (dict, OrderedDict subclasses such as pythae's ``ModelOutput``)
    keyed by :data:`ROLE_ALIASES`; an object with those attributes (dataclass,
    namedtuple, SimpleNamespace); or a tuple/list read by the order rule in the
    module docstring. Keys and attributes that name no role are ignored.

    Raises:
        OutputRolesError: a role is missing or named twice, an element is not a
            tensor, the order cannot be read, or the shapes break the contract
            (reconstruction shaped like ``x``; mu and log_var the same shape, batch B).
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of at least 2 dimensions (B, D), got {_shape(x)}")
    if isinstance(output, Tensor):
        _refuse(output, "a single tensor has no mu or log_var")
    if isinstance(output, Mapping):
        found = _by_alias(dict(output.items()), output)
        return _checked(_roles_from_found(found, output), x, output)
    if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        return _roles_from_sequence(output, x)
    found = _by_alias(_tensor_attributes(output), output)
    if found or not isinstance(output, tuple):
        return _checked(_roles_from_found(found, output), x, output)
    return _roles_from_sequence(output, x)  # a namedtuple whose fields name no role


def _by_alias(entries: Mapping[Any, object], output: object) -> dict[str, tuple[str, object]]:
    """Role -> (the key that named it, its value); two keys naming one role is an error."""
    found: dict[str, tuple[str, object]] = {}
    for role, aliases in ROLE_ALIASES.items():
        for alias in aliases:
            if alias not in entries or entries[alias] is None:
                continue
            if role in found and found[role][1] is not entries[alias]:
                _refuse(
                    output,
                    f"two entries name the {role}: {found[role][0]!r} and {alias!r}",
                )
            found.setdefault(role, (alias, entries[alias]))
    return found


def _tensor_attributes(output: object) -> dict[str, object]:
    entries: dict[str, object] = {}
    for aliases in ROLE_ALIASES.values():
        for alias in aliases:
            value = getattr(output, alias, None)
            if isinstance(value, Tensor):  # skips methods, e.g. a ``mean`` method
                entries[alias] = value
    return entries


def _roles_from_found(found: dict[str, tuple[str, object]], output: object) -> Roles:
    missing = [role for role in REQUIRED_ROLES if role not in found]
    if missing:
        _refuse(output, f"no entry for {', '.join(missing)}")
    tensors: dict[str, Tensor] = {}
    for role, (key, value) in found.items():
        if not isinstance(value, Tensor):
            _refuse(output, f"{key!r} is a {type(value).__name__}, not a tensor")
        tensors[role] = value
    return Roles(
        reconstruction=tensors["reconstruction"],
        mu=tensors["mu"],
        log_var=tensors["log_var"],
        z=tensors.get("z"),
    )


def _roles_from_sequence(output: Sequence[object], x: Tensor) -> Roles:
    tensors: list[Tensor] = []
    for i, item in enumerate(output):
        if not isinstance(item, Tensor):
            _refuse(output, f"element {i} is a {type(item).__name__}, not a tensor")
        tensors.append(item)
    echo = 1 if len(tensors) > 1 and _is_input(tensors[1], x) else None
    rest = [i for i in range(len(tensors)) if i != echo]
    if len(rest) not in (3, 4):
        besides = " besides the input echo at index 1" if echo is not None else ""
        _refuse(
            output, f"{len(rest)} elements{besides}; expected (reconstruction, mu, log_var[, z])"
        )
    like_x = [i for i in rest if _shaped_like(tensors[i], x)]
    if rest[0] in like_x:
        rec = rest[0]  # the convention: reconstruction first
    elif len(like_x) == 1:
        rec = like_x[0]
    else:
        which = "no element is" if not like_x else f"elements {like_x} are all"
        _refuse(output, f"{which} shaped like the input {_shape(x)}")
    latents = [tensors[i] for i in rest if i != rec]  # in the order returned: mu, log_var[, z]
    roles = Roles(
        reconstruction=tensors[rec],
        mu=latents[0],
        log_var=latents[1],
        z=latents[2] if len(latents) == 3 else None,
    )
    return _checked(roles, x, output)


def _is_input(t: Tensor, x: Tensor) -> bool:
    if t is x:
        return True
    if t.shape[:1] != x.shape[:1] or t.numel() != x.numel() or t.dtype != x.dtype:
        return False
    return bool(torch.equal(t.reshape(len(t), -1), x.reshape(len(x), -1)))


def _shaped_like(t: Tensor, x: Tensor) -> bool:
    """Same shape as ``x``, or its row-flat (B, D) / reshaped form."""
    if t.shape == x.shape:
        return True
    if t.dim() < 2 or t.shape[0] != x.shape[0] or 2 not in (t.dim(), x.dim()):
        return False
    return t[0].numel() == x[0].numel()


def _checked(roles: Roles, x: Tensor, output: object) -> Roles:
    if not _shaped_like(roles.reconstruction, x):
        _refuse(
            output,
            f"the reconstruction has shape {_shape(roles.reconstruction)}, "
            f"expected {_shape(x)} like the input",
        )
    mu, log_var = roles.mu, roles.log_var
    if mu.shape != log_var.shape or mu.dim() < 2 or mu.shape[0] != x.shape[0]:
        _refuse(
            output,
            f"mu {_shape(mu)} and log_var {_shape(log_var)} must both be "
            f"(B, Z) with B = {x.shape[0]}",
        )
    return roles


def _refuse(output: object, reason: str) -> NoReturn:
    raise OutputRolesError(f"model output: {reason}; got {_describe(output)}; {_NAME_THE_ROLES}")


def _shape(value: object) -> str:
    if isinstance(value, Tensor):
        return str(tuple(value.shape))
    return type(value).__name__


def _describe(value: object) -> str:
    """One line: the type, then each element's or entry's shape (or type)."""
    name = type(value).__name__
    a = f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
    if isinstance(value, Tensor):
        return f"a tensor {_shape(value)}"
    if isinstance(value, Mapping):
        return f"{a} {{{_listed(f'{k!s}: {_shape(v)}' for k, v in value.items())}}}"
    if isinstance(value, (tuple, list)):
        return f"{a} of {len(value)} [{_listed(_shape(v) for v in value)}]"
    if dataclasses.is_dataclass(value):
        attrs = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    else:
        attrs = {k: v for k, v in getattr(value, "__dict__", {}).items() if not k.startswith("_")}
    if attrs:
        return f"{a} with {_listed(f'{k}: {_shape(v)}' for k, v in attrs.items())}"
    return a


def _listed(parts: Iterable[str]) -> str:
    items = list(parts)
    if len(items) > _MAX_LISTED:
        items = [*items[:_MAX_LISTED], f"... {len(items) - _MAX_LISTED} more"]
    return ", ".join(items)


# ---- input shapes ----------------------------------------------------------------


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``: positive integers separated by commas.

    Raises:
        InputShapeError: empty text, a part that is not a positive integer.
    """
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputShapeError(
            f"--input-shape expects positive integers separated by commas, "
            f"like 1,28,28; got {text!r}"
        )
    return tuple(int(p) for p in parts)


def shape_rows(x_flat: Tensor, input_shape: tuple[int, ...]) -> Tensor:
    """``(B, D)`` -> ``(B, *input_shape)``, e.g. ``(B, C, H, W)`` for a conv model.

    Raises:
        InputShapeError: ``x_flat`` is not 2-D, or D != prod(input_shape).
    """
    if not input_shape or any(d < 1 for d in input_shape):
        raise InputShapeError(f"--input-shape must be positive sizes, got {input_shape}")
    if x_flat.dim() != 2:
        raise InputShapeError(f"expected data of shape (B, D), got {tuple(x_flat.shape)}")
    size = math.prod(input_shape)
    if x_flat.shape[1] != size:
        dims = "x".join(str(d) for d in input_shape)
        raise InputShapeError(
            f"--input-shape {','.join(map(str, input_shape))} holds {dims} = {size} values "
            f"per row, but the data has D = {x_flat.shape[1]}"
        )
    return x_flat.reshape(x_flat.shape[0], *input_shape)  # (B, C, H, W)


# ---- the user's loss ---------------------------------------------------------------

# Parameter names a loss function may use to ask for each role (or the input).
PARAMETER_ROLES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "reconstruction": (
            "recon_x",
            "recons",
            "reconstruction",
            "recon",
            "x_hat",
            "x_recon",
            "x_rec",
            "x_reconstructed",
        ),
        "input": ("x", "input", "inputs", "target", "x_original", "data"),
        "mu": ("mu", "mean", "z_mean"),
        "log_var": ("logvar", "log_var", "z_log_var"),
        "z": ("z",),
    }
)
_ROLE_OF_PARAMETER = {name: role for role, names in PARAMETER_ROLES.items() for name in names}
TOTAL_KEY = "loss"  # the dict entry that holds the total, when the loss returns one
TOTAL_TOLERANCE = 1e-5  # relative: an entry this close to the sum of the others is the total
_EPS = 1e-12  # floor of |total| in the relative unexplained share

Binding = Literal["names", "args", "output"]


class LossBindingError(ValueError):
    """The user's loss asks for parameters mtx cannot supply."""


class LossResultError(ValueError):
    """The user's loss returned something that is not a scalar, dict or tuple of scalars."""


@dataclass(frozen=True)
class LossResult:
    """One call of a loss: its total and its terms, under the user's names.

    ``unexplained`` is ``|total - sum(w * t)| / max(|total|, 1e-12)`` over the terms:
    0 when the weighted terms add up to the total (or there are no terms), NaN when
    a value is NaN (carried, not raised: a finding for later) or when it was not measured
    (``measure=False``: the caller reads the values itself, saving a host copy).
    """

    total: Tensor  # scalar, differentiable when the loss is
    terms: Mapping[str, Tensor]  # scalars, the user's names, in the user's order
    weights: Mapping[str, float]  # one per term
    assumed_weights: tuple[str, ...]  # terms whose weight 1.0 was assumed, not given
    total_given: bool  # False: total = sum(w * t), computed here
    detached: tuple[str, ...]  # terms that do not require grad
    unexplained: float
    ignored: tuple[str, ...] = ()  # dict entries that are not tensors (not terms)

    @classmethod
    def build(
        cls,
        terms: Mapping[str, Tensor],
        total: Tensor | None = None,
        weights: Mapping[str, float] | None = None,
        ignored: tuple[str, ...] = (),
        measure: bool = True,
    ) -> LossResult:
        """A result from scalar terms and, when the loss gave one, its total.

        Without ``total`` it is ``sum(w * t)``. ``weights`` may name some terms;
        the others get 1.0 and are listed in ``assumed_weights``. ``measure=False``
        leaves ``unexplained`` NaN for a given total (no host copy).

        Raises:
            LossResultError: a term or the total is not a scalar tensor, ``weights``
                names a term that is absent, or there is neither a total nor a term.
        """
        given = dict(weights or {})
        unknown = [name for name in given if name not in terms]
        if unknown:
            raise LossResultError(
                f"weights name {', '.join(map(repr, unknown))}, which the loss did not "
                f"return; its terms: {', '.join(map(repr, terms)) or 'none'}"
            )
        scalars = {name: _scalar(t, name) for name, t in terms.items()}
        w = {name: float(given.get(name, 1.0)) for name in scalars}
        if total is None:
            if not scalars:
                raise LossResultError("the loss returned neither a total nor any term")
            weighted = [w[name] * t for name, t in scalars.items()]
            total_t = weighted[0]
            for t in weighted[1:]:  # not torch.stack: terms may differ in dtype
                total_t = total_t + t
            unexplained = 0.0
        else:
            total_t = _scalar(total, "total")
            unexplained = 0.0
            if scalars:
                unexplained = _unexplained(total_t, scalars, w) if measure else math.nan
        return cls(
            total=total_t,
            terms=MappingProxyType(scalars),
            weights=MappingProxyType(w),
            assumed_weights=tuple(name for name in scalars if name not in given),
            total_given=total is not None,
            detached=tuple(name for name, t in scalars.items() if not t.requires_grad),
            unexplained=unexplained,
            ignored=ignored,
        )


def _scalar(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise LossResultError(f"{name} is a {type(value).__name__}, expected a scalar tensor")
    if value.numel() != 1:
        raise LossResultError(
            f"{name} has shape {tuple(value.shape)}, expected a scalar tensor "
            "(reduce it over the batch: .sum() or .mean())"
        )
    return value if value.dim() == 0 else value.reshape(())


def _unexplained(total: Tensor, terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> float:
    """One device-to-host transfer: the total and every term, in float64."""
    values = torch.stack([total.detach().double(), *(t.detach().double() for t in terms.values())])
    total_v, *term_vs = values.tolist()
    explained = sum(weights[name] * v for name, v in zip(terms, term_vs))
    return abs(total_v - explained) / max(abs(total_v), _EPS)


class UserLoss:
    """The user's loss function, called with what it asks for, read into a LossResult.

    Binding, decided once from ``fn``'s signature, the first that applies:

    - ``"names"``: its parameters name roles (see :data:`PARAMETER_ROLES`: ``recon_x``,
      ``recons``, ``reconstruction``, ``recon``, ``x_hat``...; ``x``, ``input``,
      ``inputs``, ``target``, ``x_original``, ``data``; ``mu``, ``mean``; ``logvar``,
      ``log_var``; ``z``) and every required parameter is one of them or is given in
      ``extra_kwargs``: called with the roles by keyword (pytorch/examples'
      ``loss_function(recon_x, x, mu, logvar)``). A role parameter with a default
      (``z=None``) is left to it when the output has no such role.
    - ``"args"``: it takes ``*args``: called as ``fn(*output, **extra_kwargs)`` with the
      model's output sequence as returned (AntixK's ``loss_function(*args, **kwargs)``
      reading ``args[0..3]`` and ``kwargs['M_N']``).
    - ``"output"``: it takes exactly two required positional parameters:
      ``fn(output, x, **extra_kwargs)``.

    Args:
        fn: the loss; for a method, pass it bound (``model.loss_function``).
        extra_kwargs: passed by keyword on every call, e.g. ``{"M_N": 0.005}``.
        weights: per-term weights, by the user's term names: the total when the loss
            returns none, and the sum check (see :class:`LossResult`); others get 1.0.
        name: how messages name the loss; defaults to ``fn``'s qualified name.

    Raises:
        LossBindingError: at construction, naming the parameters it cannot bind.

    Example:
        >>> loss = UserLoss(loss_function)  # doctest: +SKIP
        >>> result = loss(model(x), x)  # doctest: +SKIP
        >>> result.total.backward()  # doctest: +SKIP
    """

    def __init__(
        self,
        fn: Callable[..., object],
        extra_kwargs: Mapping[str, object] | None = None,
        weights: Mapping[str, float] | None = None,
        name: str | None = None,
    ) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__qualname__", type(fn).__name__))
        # plain dicts inside, read-only views outside: a UserLoss stays picklable
        self._extra = dict(extra_kwargs or {})
        self._weights = {str(k): float(w) for k, w in (weights or {}).items()}
        self.binding: Binding
        self.binding, self._roles, self._optional = _bind(fn, self._extra, self.name)

    @property
    def extra_kwargs(self) -> Mapping[str, object]:
        return MappingProxyType(self._extra)

    @property
    def weights(self) -> Mapping[str, float]:
        return MappingProxyType(self._weights)

    def set_extra_kwarg(self, name: str, value: object) -> None:
        """Change one keyword passed on every call (a β schedule driving ``M_N``)."""
        self._extra[name] = value

    @property
    def parameter_roles(self) -> Mapping[str, str]:
        """Parameter name -> role (``reconstruction``, ``input``, ...), for ``"names"``."""
        return MappingProxyType(self._roles)

    def __call__(self, output: object, x: Tensor) -> LossResult:
        """Call the loss on a model output and the batch ``x`` the model was given."""
        kwargs = dict(self._extra)
        if self.binding == "names":
            roles = output_roles(output, x)
            values: dict[str, Tensor | None] = {**roles.as_dict(), "input": x, "z": roles.z}
            for param, role in self._roles.items():
                value = values[role]
                if value is None and param in self._optional:
                    continue
                if value is None:
                    raise LossBindingError(
                        f"loss {self.name}: its parameter {param!r} asks for z, "
                        "but the model output has none"
                    )
                kwargs[param] = value
            returned = self._run(**kwargs)
        elif self.binding == "args":
            if not isinstance(output, (tuple, list)):
                raise LossBindingError(
                    f"loss {self.name} takes *args, so it is given the model's output "
                    f"sequence, but the model returned {_describe(output)}; "
                    "name its parameters (recon_x, x, mu, logvar) instead"
                )
            returned = self._run(*output, **kwargs)
        else:
            returned = self._run(output, x, **kwargs)
        return read_loss_result(returned, self._weights, self.name)

    def _run(self, *args: object, **kwargs: object) -> object:
        try:
            return self.fn(*args, **kwargs)
        except (Exception, SystemExit) as e:  # the user's code: any error is theirs to fix
            hint = ""
            if isinstance(e, KeyError) and self.binding == "args":
                hint = (
                    " (give what it reads from **kwargs: --loss-arg KEY=VALUE on the command "
                    "line, extra_kwargs= in Python)"
                )
            from meaning_transform.user_model import UserCodeError, raised

            raise UserCodeError(f"loss {self.name} {raised(e)}{hint}") from e


_P = inspect.Parameter
_POSITIONAL = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)


def _bind(
    fn: Callable[..., object], extra: Mapping[str, object], name: str
) -> tuple[Binding, dict[str, str], frozenset[str]]:
    """(binding, role parameters -> roles, those of them with defaults); see UserLoss."""
    # a Module's __call__ is (*args, **kwargs): its forward says what it takes
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError) as e:  # a builtin without a signature
        raise LossBindingError(f"loss {name}: cannot read its signature ({e})") from e
    if params and params[0].name == "self" and params[0].kind in _POSITIONAL:
        raise LossBindingError(
            f"loss {name} takes 'self': pass the method bound to its object "
            "(model.loss_function), not the function"
        )
    named = [p for p in params if p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)]
    unknown = [k for k in extra if k not in {p.name for p in named}]
    if unknown and not any(p.kind is _P.VAR_KEYWORD for p in params):
        raise LossBindingError(
            f"loss {name} has no parameter {', '.join(map(repr, unknown))} given in extra_kwargs"
        )
    required = [p for p in named if p.default is p.empty and p.name not in extra]
    role_params = {
        p.name: _ROLE_OF_PARAMETER[p.name]
        for p in named
        if p.name in _ROLE_OF_PARAMETER and p.name not in extra
    }
    twice = _named_twice(role_params)
    if twice:
        raise LossBindingError(
            f"loss {name}: parameters {' and '.join(map(repr, twice[1]))} both name the "
            f"{twice[0]}; rename one (for the reconstruction: recon_x; the input: x)"
        )
    unbound = [p.name for p in required if p.name not in role_params]
    # positional-only parameters cannot be passed by keyword
    by_keyword = all(p.kind is not _P.POSITIONAL_ONLY for p in named if p.name in role_params)
    if role_params and not unbound and by_keyword:
        optional = frozenset(p.name for p in named if p.name in role_params and p not in required)
        return "names", role_params, optional
    if any(p.kind is _P.VAR_POSITIONAL for p in params):
        unbound = [p.name for p in required if p.kind is _P.KEYWORD_ONLY]
        if not unbound:
            return "args", {}, frozenset()
    elif len(required) == 2 and all(p.kind in _POSITIONAL for p in required):
        return "output", {}, frozenset()
    missing = unbound or [p.name for p in required]
    raise LossBindingError(
        f"loss {name}: cannot bind {', '.join(map(repr, missing)) or 'its parameters'}; "
        "name its parameters after roles (recon_x, x, mu, logvar[, z]), "
        "take *args (the model's output sequence), or take (output, x)"
    )


def _named_twice(role_params: Mapping[str, str]) -> tuple[str, list[str]] | None:
    """The first role two parameters ask for (torch's ``(input, target)`` is one)."""
    for role in PARAMETER_ROLES:
        params = [p for p, r in role_params.items() if r == role]
        if len(params) > 1:
            return role, params
    return None


def read_loss_result(
    returned: object,
    weights: Mapping[str, float] | None = None,
    name: str = "loss",
    measure: bool = True,
) -> LossResult:
    """Read what a loss returned into a LossResult.

    - One scalar tensor: the total, no terms.
    - A dict (Mapping): its tensor entries are scalar terms; the entry under ``"loss"``
      is the total. Without ``"loss"``, an entry equal to the weighted sum of all the
      others (within 1e-5 relative; only when exactly one is, among 3 or more) is the
      total, else the total is the weighted sum. Non-tensor entries (floats, nested
      dicts) are not terms: they are listed in ``ignored``.
    - A tuple or list of scalar tensors: the first is the total when it equals the
      weighted sum of the rest within 1e-5 relative, and the rest are named
      ``term_1, term_2, ...`` (their positions); otherwise all are terms named
      ``term_0, term_1, ...`` and the total is their weighted sum.

    ``measure=False``: ``unexplained`` is left NaN when the total is given (see
    :meth:`LossResult.build`).

    Raises:
        LossResultError: a non-tensor, a non-scalar, a dict or tuple without tensors.
    """
    try:
        return _read(returned, weights, measure)
    except LossResultError as e:
        raise LossResultError(f"loss {name} returned {_describe(returned)}: {e}") from None


def _read(returned: object, weights: Mapping[str, float] | None, measure: bool) -> LossResult:
    weights = weights or {}
    if isinstance(returned, Tensor):
        return LossResult.build({}, total=returned, weights=weights)
    if isinstance(returned, Mapping):
        tensors = {str(k): v for k, v in returned.items() if isinstance(v, Tensor)}
        ignored = tuple(str(k) for k, v in returned.items() if not isinstance(v, Tensor))
        if not tensors:
            raise LossResultError("a dict with no tensor in it")
        if TOTAL_KEY in tensors:
            given = tensors.pop(TOTAL_KEY)
            return LossResult.build(tensors, given, weights, ignored, measure)
        key = _total_among(tensors, weights, first_only=False)
        found = tensors.pop(key) if key is not None else None
        return LossResult.build(tensors, found, weights, ignored, measure)
    if isinstance(returned, (tuple, list)):
        if not returned:
            raise LossResultError("an empty sequence")
        bad = [i for i, t in enumerate(returned) if not isinstance(t, Tensor)]
        if bad:
            raise LossResultError(f"element {bad[0]} is not a tensor")
        if len(returned) == 1:
            return LossResult.build({}, total=returned[0], weights=weights)
        named = {f"term_{i}": t for i, t in enumerate(returned)}
        first = _total_among(named, weights, first_only=True)
        total = named.pop(first) if first is not None else None
        return LossResult.build(named, total, weights, measure=measure)
    raise LossResultError("expected a scalar tensor, a dict of them or a tuple of them")


def _total_among(
    entries: Mapping[str, Tensor], weights: Mapping[str, float], first_only: bool
) -> str | None:
    """The one entry equal to the weighted sum of the others, if exactly one is."""
    scalars = {name: _scalar(t, name) for name, t in entries.items()}
    if len(scalars) < (2 if first_only else 3):
        return None
    values = torch.stack([t.detach().double() for t in scalars.values()]).tolist()
    w = [float(weights.get(name, 1.0)) for name in scalars]
    weighted = sum(wi * v for wi, v in zip(w, values))
    candidates = range(1) if first_only else range(len(values))
    matches = []
    for i in candidates:
        rest = weighted - w[i] * values[i]
        if abs(values[i] - rest) <= TOTAL_TOLERANCE * max(abs(values[i]), _EPS):
            matches.append(list(scalars)[i])
    return matches[0] if len(matches) == 1 else None


# ---- reductions by measurement ---------------------------------------------------

MeasuredReduction = Literal["sum", "mean", "unknown"]
REDUCTION_SLICE = 16  # rows of the batch used to measure: enough, and cheap
_RATIO_TOLERANCE = 1e-3  # relative, on the doubled/single ratio (float32 sums)
TOTAL_NAME = "total"


def measure_reductions(
    user_loss: UserLoss, output: object, x: Tensor
) -> dict[str, MeasuredReduction]:
    """``"sum"`` or ``"mean"`` over the batch for the total and each term, by measurement.

    The loss is called on the first min(B, 16) rows of every batch-shaped tensor in
    the output (dict, tuple, list or object; others untouched) and of ``x``, then on
    those rows twice (concatenated along dim 0): a value that doubles is summed over
    the batch, one that stays is a mean, anything else (or a zero, NaN or missing
    value) is ``"unknown"``. Runs under ``torch.no_grad()``; torch's global RNG state
    is saved and restored around it. Keys: ``"total"``, then the terms in the loss's
    order (a term itself named ``"total"`` is reported as ``"total (term)"``).
    """
    rows = min(x.shape[0], REDUCTION_SLICE)
    with torch.no_grad(), _rng_restored(x.device):
        x1 = x[:rows]
        x2 = torch.cat([x1, x1])  # (2b, ...)
        once = user_loss(_rebuilt(output, x, x1, lambda t: t[:rows]), x1)
        twice = user_loss(_rebuilt(output, x, x2, lambda t: torch.cat([t[:rows]] * 2)), x2)
    names = [TOTAL_NAME, *once.terms]
    a = [once.total, *once.terms.values()]
    nan = once.total.new_tensor(math.nan)
    b = [twice.total, *(twice.terms.get(n, nan) for n in once.terms)]
    values = torch.stack([t.detach().double() for t in a + b]).tolist()  # one transfer
    result: dict[str, MeasuredReduction] = {}
    for i, name in enumerate(names):
        key = "total (term)" if i and name == TOTAL_NAME else name
        result[key] = _reduction(values[i], values[len(names) + i])
    return result


def _reduction(single: float, doubled: float) -> MeasuredReduction:
    if not (math.isfinite(single) and math.isfinite(doubled)) or single == 0:
        return "unknown"
    ratio = doubled / single
    if abs(ratio - 2.0) <= 2.0 * _RATIO_TOLERANCE:
        return "sum"
    if abs(ratio - 1.0) <= _RATIO_TOLERANCE:
        return "mean"
    return "unknown"


def _rebuilt(output: object, x: Tensor, new_x: Tensor, rows: Callable[[Tensor], Tensor]) -> object:
    """The output's structure with each batch tensor replaced by ``rows(tensor)``.

    The input echo (a tensor that *is* ``x``) becomes ``new_x``; a tensor shared by
    two places stays shared.
    """
    batch = x.shape[0]
    memo: dict[int, Tensor] = {id(x): new_x}

    def tensor(t: Tensor) -> Tensor:
        if id(t) not in memo:
            memo[id(t)] = rows(t) if t.dim() >= 1 and t.shape[0] == batch else t
        return memo[id(t)]

    return _map_tensors(output, tensor)


def _map_tensors(obj: object, fn: Callable[[Tensor], Tensor]) -> object:
    """``obj`` rebuilt with ``fn`` applied to every tensor in it, its types kept."""
    if isinstance(obj, Tensor):
        return fn(obj)
    kind: Any = type(obj)
    if isinstance(obj, Mapping):
        items = {k: _map_tensors(v, fn) for k, v in obj.items()}
        return _rebuild(kind, items, dict)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return kind(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        seq = [_map_tensors(v, fn) for v in obj]
        return _rebuild(kind, seq, list if isinstance(obj, list) else tuple)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        changes = {f.name: _map_tensors(getattr(obj, f.name), fn) for f in fields if f.init}
        return dataclasses.replace(obj, **changes)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):  # SimpleNamespace, any object
        new = copy.copy(obj)
        for key, value in vars(obj).items():
            mapped = _map_tensors(value, fn)
            if mapped is not value:
                object.__setattr__(new, key, mapped)
        return new
    return obj


def _rebuild(kind: Any, contents: object, plain: type) -> object:
    """``kind(contents)``: the user's own container type (pythae's ``ModelOutput``),
    or the plain one when that subclass's constructor wants other arguments."""
    if kind is plain:
        return plain(contents)
    try:
        return kind(contents)
    except Exception:  # a subclass constructor of another shape: keep the contents
        return plain(contents)


@contextmanager
def _rng_restored(device: torch.device) -> Iterator[None]:
    """Save torch's global RNG state (CPU, and the device's when CUDA) and restore it."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield


# --------------------------------------------------------------------------- the loop's loss


class LossStep(nn.Module):
    """The user's loss as the training loop and the Doctor take a loss.

    Called with the named roles mtx reads and the data rows, it calls the user's loss
    with what the user's model returned and the input it saw (``last_call(model)``
    gives both; without it, the roles dict and the rows), and returns the step result
    every loss in mtx returns (the keys :class:`~meaning_transform.losses.CombinedLoss`
    returns): ``loss`` (the total), ``terms`` (unweighted, undetached, the user's
    names), ``weights``, ``reduction`` (measured once, on the first call, by
    :func:`measure_reductions`), ``floors_engaged`` and ``non_finite`` (none: a user's
    loss has no floors; a NaN is carried into the total and becomes a finding), plus
    ``unexplained`` and ``detached`` from :class:`LossResult`.

    ``beta_kwarg`` names the keyword of the user's loss that takes the KL weight (e.g.
    ``M_N`` or ``beta``), so a β schedule can drive it: ``kl_loss_weight`` reads and
    sets it.
    """

    def __init__(
        self,
        user_loss: UserLoss,
        last_call: Callable[[], tuple[object, Tensor] | None] = lambda: None,
        beta_kwarg: str | None = None,
    ) -> None:
        super().__init__()
        self.user_loss = user_loss
        self._last_call = last_call
        self.beta_kwarg = beta_kwarg
        self._reduction: dict[str, str] | None = None

    @property
    def kl_loss_weight(self) -> float:
        if self.beta_kwarg is None:
            return math.nan
        value = self.user_loss.extra_kwargs.get(self.beta_kwarg, math.nan)
        return float(value) if isinstance(value, (int, float)) else math.nan

    @kl_loss_weight.setter
    def kl_loss_weight(self, beta: float) -> None:
        if self.beta_kwarg is None:
            raise LossBindingError("this loss has no keyword for the KL weight (beta_kwarg)")
        self.user_loss.set_extra_kwarg(self.beta_kwarg, beta)

    def forward(self, roles: Mapping[str, Tensor], rows: Tensor) -> dict[str, Any]:
        call = self._last_call()
        output, x = call if call is not None else (roles, rows)
        result = self.user_loss(output, x)
        if self._reduction is None:
            self._reduction = dict(measure_reductions(self.user_loss, output, x))
        return {
            "loss": result.total,
            "terms": dict(result.terms),
            "weights": dict(result.weights),
            "reduction": {n: r for n, r in self._reduction.items() if n in result.terms},
            "floors_engaged": (),
            "non_finite": (),
            "unexplained": result.unexplained,
            "detached": result.detached,
            "total_given": result.total_given,
        }
