"""Defects from good parts only: a PatchCore scorer fitted on good images, exported as one ONNX graph
(score and anomaly map), quantized, compiled and validated by scores (AUROC, decisions) through the
same stages as a classifier.

Nothing is imported here: `metrics` and `parity` are numpy only (the device runtime uses them for the
golden set), `fit` and `patchcore` need torch. The public names are on `edgetransfer` itself.
"""
