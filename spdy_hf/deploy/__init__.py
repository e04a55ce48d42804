"""A profile's fast form: removed heads and neurons cut out (`shrink`) and sparse kernels swapped in (`kernels`:
CSR `FastLinear` on a CPU; `two_four`: 2:4 `TwoFourLinear` on an NVIDIA GPU); `deploy_profile` puts a saved profile
into a model."""

from .kernels import FastLinear
from .shrink import deploy_profile

__all__ = ["FastLinear", "deploy_profile"]
