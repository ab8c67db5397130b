"""Calibrated uncertainty: split conformal, temperature scaling, referral, evaluation.

Pure numpy except `recalibration` and `evaluation` (they run a bundle through the engine) and
`report` (matplotlib, imported only when a report is drawn). No FastAPI import anywhere here.
"""
