"""An onnxruntime CPU session: how the frozen trunk (training) and every exported model
(deploy) run under onnxruntime. Imports onnxruntime only when called."""

from __future__ import annotations

from pathlib import Path


def open_session(onnx_path: str | Path | bytes, threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU session of a file (or a serialized model); `threads` caps
    intra-op threads (default: all cores). spinning=False: its threads sleep between runs
    instead of spinning, for callers that do other CPU work between runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    source = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
