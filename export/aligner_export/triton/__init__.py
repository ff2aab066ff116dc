"""Triton Inference Server for fleets (issue 13).

- :mod:`.repository`: ``aligner-export triton``'s model repository: ``config.pbtxt`` (decoupled, dynamic batching,
  instance count, max batch size) and a Python-backend model over the export, copied or referenced.
- ``model.py`` (this folder): the Python-backend model, copied verbatim into ``REPO/NAME/1/model.py``. It runs
  ``aligner_runtime`` with the continuous-batching scheduler; it is never imported here (it needs Triton's
  ``triton_python_backend_utils``).
- :mod:`.server`: runs the ``tritonserver`` that PyPI's ``nvidia-pytriton`` carries, on a CPU machine (its Python
  backend stub put in place, the model's execution environment given). JetPack's Triton needs none of it.

See docs/serving.md.
"""
