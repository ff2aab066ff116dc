"""The PyTorch side: model families, loading, the hook reference, calibration, the export pipeline and its
validation against the reference, the embedded model zoo. Imports torch and transformers inside functions.
"""
