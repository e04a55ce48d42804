"""Few-sample recovery after pruning: the remaining weights fitted to the dense model with the profile's zeros held
(`HeldZeros`), by global gAP or block by block (`Recovery`); the pipeline's stage is `recovery_stage`."""

from .fit import Recovery, RecoveryRecord, recovery_stage
from .held_zeros import HeldZeros

__all__ = ["HeldZeros", "Recovery", "RecoveryRecord", "recovery_stage"]
