"""The precision object (training-loop hooks), loss scaling and parameter updates."""

from lowbit.precision.policy import Precision
from lowbit.precision.scaler import LossScaler, NoLossScaler
from lowbit.precision.update import FullPrecisionUpdate, LowPrecisionUpdate

__all__ = ["FullPrecisionUpdate", "LossScaler", "LowPrecisionUpdate", "NoLossScaler", "Precision"]
