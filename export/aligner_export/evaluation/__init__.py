"""Evaluation of an export, steered against unsteered: the prompt sets, the judge and the report (``aligner-export
eval``). Runs on the runtime package; no torch.
"""
