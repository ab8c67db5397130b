"""Calibration fitting and evaluation: the `calibrate` and `evaluate` commands.

One noun per module: `temperature` and `metrics` are numpy; `vector` (vector scaling) fits with
torch L-BFGS and `selection` chooses between the two; `data` and `text_data` read labelled
CSVs; `recalibration` (the `calibrate` command) and `evaluation` run a bundle through the engine;
`report` draws with matplotlib, imported only there. What is applied at serve time (split
conformal quantiles, the referral rules, `Calibrator`) lives in `service.engine`, below this
package, so the engine never imports it. No FastAPI import anywhere here.
"""
