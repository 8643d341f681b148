"""Calibration and weight quantization: activation statistics over a calibration set, quantization
schemes as transformations of the weight table, and an accuracy report against the fp32 model."""
