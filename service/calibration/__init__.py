"""Calibrated uncertainty: split conformal, temperature scaling, referral, evaluation.

One noun per module: `conformal`, `temperature`, `metrics` and `referral` are numpy (plus the
manifest types); `calibrator` applies a bundle's calibration to served summaries; `data` reads
labelled CSVs; `recalibration` (the `calibrate` command) and `evaluation` run a bundle through
the engine; `report` draws with matplotlib, imported only there. No FastAPI import anywhere here.
"""
