"""The VAE that ``mtx`` trains: an MLP encoder, an MLP decoder, and the reparameterisation.

Letters in shape comments: B batch, D data features, Z latent dimensions.

Two properties matter for diagnosing training, and both come from the original bug:

* **Noise is fresh on every training call.** The original reseeded its noise on every
  forward pass, so ``eps`` never changed and the "stochastic" latent was a fixed offset
  of ``mu``. Here the model owns a CPU ``torch.Generator`` seeded from ``seed``: each call
  draws new ``eps`` from it, the whole sequence is reproducible from the seed, and the
  global RNG is never touched. ``noise="frozen"`` brings the bug back on purpose (the
  generator is reseeded before every draw) so that a fault scenario can reproduce it;
  ``noise="exp_logvar"`` (sigma = exp(log_var), the variance used as the standard
  deviation) and ``noise="scaled"`` (eps times 0.01) bring back two other common bugs.
* **Construction is deterministic from ``seed``.** Parameters are initialised under
  ``torch.random.fork_rng()`` with ``torch.manual_seed(seed)``, so two models built with
  the same arguments are identical and the caller's global RNG state is left as it was.

The generator's state is not part of ``state_dict()``; call :meth:`MeaningVAE.reset_noise`
after loading a checkpoint if the noise stream must restart from a known point.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

OUTPUT_ACTIVATIONS: tuple[str, ...] = ("none", "sigmoid")
NOISE_MODES: tuple[str, ...] = ("fresh", "frozen", "exp_logvar", "scaled")
SCALED_NOISE = 0.01  # noise="scaled": the "small noise for stability" bug
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def _hidden_block(
    in_features: int, out_features: int, use_batch_norm: bool, activation: str
) -> nn.Sequential:
    """Linear (+ BatchNorm1d) + activation, with readable names for diagnostics tables."""
    parts: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(in_features, out_features))
    if use_batch_norm:
        parts["norm"] = nn.BatchNorm1d(out_features)
    parts["act"] = ACTIVATIONS[activation]()
    return nn.Sequential(parts)


def _mlp(
    in_features: int, hidden_dims: Sequence[int], use_batch_norm: bool, activation: str
) -> nn.Sequential:
    sizes = [in_features, *hidden_dims]
    return nn.Sequential(
        *(
            _hidden_block(a, b, use_batch_norm, activation)
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
    )


class Encoder(nn.Module):
    """Maps data to the parameters of a diagonal Gaussian posterior q(z | x).

    Args:
        input_dim: D, features per sample.
        latent_dim: Z, latent dimensions.
        hidden_dims: widths of the hidden layers, first layer first.
        use_batch_norm: add ``BatchNorm1d`` after each hidden ``Linear``.
        activation: one of :data:`ACTIVATIONS`.

    Shape:
        input ``(B, D)``; output ``(mu, log_var)``, each ``(B, Z)``.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (64, 32),
        use_batch_norm: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.layers = _mlp(input_dim, hidden_dims, use_batch_norm, activation)
        width = hidden_dims[-1] if hidden_dims else input_dim
        self.fc_mu = nn.Linear(width, latent_dim)
        self.fc_log_var = nn.Linear(width, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layers(x)  # (B, H)
        return self.fc_mu(h), self.fc_log_var(h)  # (B, Z), (B, Z)


class Decoder(nn.Module):
    """Maps latent codes back to data space.

    Args:
        latent_dim: Z, latent dimensions.
        output_dim: D, features per sample.
        hidden_dims: widths of the hidden layers in the decoder's own order (first layer
            first); :class:`MeaningVAE` passes the encoder's widths reversed.
        use_batch_norm: add ``BatchNorm1d`` after each hidden ``Linear``.
        activation: one of :data:`ACTIVATIONS`.
        output_activation: ``"none"`` (real-valued output, for MSE) or ``"sigmoid"``
            (output in (0, 1), for BCE).

    Shape:
        input ``(B, Z)``; output ``(B, D)``.
    """

    def __init__(
        self,
        latent_dim: int,
        output_dim: int,
        hidden_dims: Sequence[int] = (32, 64),
        use_batch_norm: bool = True,
        activation: str = "relu",
        output_activation: str = "none",
    ) -> None:
        super().__init__()
        self.layers = _mlp(latent_dim, hidden_dims, use_batch_norm, activation)
        width = hidden_dims[-1] if hidden_dims else latent_dim
        self.fc_out = nn.Linear(width, output_dim)
        self.out_act: nn.Module = nn.Sigmoid() if output_activation == "sigmoid" else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out_act(self.fc_out(self.layers(z)))  # (B, D)


class MeaningVAE(nn.Module):
    """A small MLP VAE for agent states (or any flat numeric data).

    Args:
        input_dim: D, features per sample (10 for the agent-state layout).
        latent_dim: Z, latent dimensions.
        hidden_dims: encoder hidden widths; the decoder mirrors them reversed.
        use_batch_norm: ``BatchNorm1d`` after every hidden ``Linear``. Training mode then
            needs batches of at least two samples.
        output_activation: ``"none"`` or ``"sigmoid"`` (pair it with a BCE loss).
        activation: hidden activation, one of :data:`ACTIVATIONS`.
        seed: seeds both the parameter initialisation and the noise generator.
        noise: ``"fresh"`` (new ``eps`` on every training call, reproducible from ``seed``).
            The other modes are bugs kept for fault scenarios; do not train with them:
            ``"frozen"`` reseeds the generator before every draw so ``eps`` never changes
            (the original bug), ``"exp_logvar"`` uses ``exp(log_var)`` (the variance) as
            sigma, ``"scaled"`` multiplies ``eps`` by :data:`SCALED_NOISE`.

    Shape:
        ``forward(x)`` takes ``(B, D)`` and returns a dict with ``reconstruction`` ``(B, D)``
        and ``mu``, ``log_var``, ``z``, each ``(B, Z)``. In eval mode ``z`` is ``mu``.

    Example:
        >>> model = MeaningVAE(input_dim=10, latent_dim=4, seed=0)
        >>> out = model(torch.rand(8, 10))
        >>> out["z"].shape
        torch.Size([8, 4])
    """

    def __init__(
        self,
        input_dim: int = 10,
        latent_dim: int = 4,
        hidden_dims: Sequence[int] = (64, 32),
        use_batch_norm: bool = True,
        output_activation: str = "none",
        activation: str = "relu",
        seed: int = 0,
        noise: str = "fresh",
    ) -> None:
        super().__init__()
        hidden_dims = tuple(hidden_dims)
        _check_args(input_dim, latent_dim, hidden_dims, output_activation, activation, seed, noise)
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        self.hidden_dims = hidden_dims
        self.use_batch_norm = use_batch_norm
        self.output_activation = output_activation
        self.activation = activation
        self.seed = seed
        self.noise = noise
        # Initialise from `seed` without moving the caller's global RNG. devices=[] keeps
        # fork_rng from touching (or warning about) accelerator RNGs: init runs on the CPU.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = Encoder(input_dim, latent_dim, hidden_dims, use_batch_norm, activation)
            self.decoder = Decoder(
                latent_dim,
                input_dim,
                hidden_dims[::-1],
                use_batch_norm,
                activation,
                output_activation,
            )
        self._noise_seed = seed
        self._noise_generator = torch.Generator(device="cpu")
        self._noise_generator.manual_seed(seed)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        mu, log_var = self.encoder(x)  # (B, Z), (B, Z)
        z = self.reparameterize(mu, log_var)  # (B, Z)
        return {"reconstruction": self.decoder(z), "mu": mu, "log_var": log_var, "z": z}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, log_var)`` of q(z | x), each ``(B, Z)``."""
        self._check_input(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(B, D)`` from latent codes ``(B, Z)``."""
        return self.decoder(z)

    def reparameterize(self, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """``mu + exp(0.5 * log_var) * eps`` in training mode, ``mu`` in eval mode (the
        ``exp_logvar`` and ``scaled`` noise modes get it wrong on purpose).

        ``log_var`` is not clamped here: an exploding variance should reach the loss
        checks and be reported, not be hidden by the model.
        """
        if not self.training:
            return mu
        eps = self._draw_eps(mu)  # (B, Z)
        if self.noise == "exp_logvar":
            return mu + torch.exp(log_var) * eps  # the bug: the variance used as sigma
        if self.noise == "scaled":
            eps = SCALED_NOISE * eps  # the bug: noise shrunk "for stability"
        return mu + torch.exp(0.5 * log_var) * eps

    def reset_noise(self, seed: int | None = None) -> None:
        """Restart the noise stream from ``seed`` (default: the constructor's ``seed``).

        In ``"frozen"`` mode ``seed`` also becomes the seed reused on every call.
        """
        if seed is not None:
            _check_seed(seed)
            self._noise_seed = seed
        self._noise_generator.manual_seed(self._noise_seed)

    def _draw_eps(self, mu: torch.Tensor) -> torch.Tensor:
        if self.noise == "frozen":
            self._noise_generator.manual_seed(self._noise_seed)  # the original bug
        # Draw on the CPU in float32, then move: the same eps on every device and dtype.
        eps = torch.randn(mu.shape, generator=self._noise_generator, dtype=torch.float32)
        return eps.to(mu.device, mu.dtype)  # (B, Z)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected input of shape (B, {self.input_dim}), got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"seed={self.seed}, noise={self.noise!r}"


def ordered_linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` in ``model`` with its qualified name, in registration order.

    For :class:`MeaningVAE` that is the encoder's hidden layers, ``fc_mu``, ``fc_log_var``,
    then the decoder's hidden layers and ``fc_out``: the first entry is the layer nearest
    the input and the last the layer nearest the output, as first-to-last gradient ratios
    need.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def _check_args(
    input_dim: int,
    latent_dim: int,
    hidden_dims: tuple[int, ...],
    output_activation: str,
    activation: str,
    seed: int,
    noise: str,
) -> None:
    for name, value in (("input_dim", input_dim), ("latent_dim", latent_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_dims):
        raise ValueError(f"hidden_dims must be integers >= 1, got {hidden_dims!r}")
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(
            f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    _check_seed(seed)
