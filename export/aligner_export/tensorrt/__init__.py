"""TensorRT engine build and the ONNX Runtime vs TensorRT comparison, on Polygraphy's loaders. ``tensorrt`` is
imported only when a build or a comparison runs.
"""
