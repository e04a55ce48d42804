"""Calibration data: texts from the built-in corpus, files or Hub datasets made into token windows
(`calibration_windows`, the stage's entry), and the sequential runner that feeds them block by block to the
database and to layer-wise recovery (`SequentialCalibrator`)."""

from .sequential import SequentialCalibrator
from .text import load_texts, token_windows
from .windows import calibration_windows

__all__ = ["SequentialCalibrator", "calibration_windows", "load_texts", "token_windows"]
