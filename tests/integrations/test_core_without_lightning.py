"""The core never imports lightning: only meaning_transform.integrations.lightning does."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import torch
import meaning_transform
import meaning_transform.integrations
from meaning_transform.diagnostics.doctor import Doctor
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(4, 4), torch.nn.Linear(2, 4)
    def forward(self, x):
        mu, log_var = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        return {"reconstruction": self.dec(z), "mu": mu, "log_var": log_var, "z": z}
model = Tiny()
with Doctor(model) as doctor:
    x = torch.randn(8, 4)
    out = model(x)
    recon = out["reconstruction"].pow(2).mean()
    loss = {"loss": recon, "recon": recon}
    doctor.step(out, loss, x)
    loss["loss"].backward()
doctor.findings(data=x)
doctor.metrics()
assert "lightning" not in sys.modules, sorted(m for m in sys.modules if "lightning" in m)
"""


def test_importing_the_package_and_running_the_doctor_does_not_import_lightning():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
