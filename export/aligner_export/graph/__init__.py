"""Graph surgery on ONNX models, torch-free: the steering operators as ONNX functions, the residual locator, the
rewrite that places SteerGate/SteerShift, and the export manifest. Imports only onnx, onnx-ir, numpy and
``aligner_runtime``.
"""
