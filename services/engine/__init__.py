"""All torch / onnx / onnxruntime work. Imported only inside a job's child process.

Exception: `registry` and `methods` declare schemas without importing torch, so the web
process may import them to build forms.
"""
