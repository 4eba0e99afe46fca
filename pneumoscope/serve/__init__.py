"""The web app and JSON API (FastAPI + uvicorn): ``create_app(run_dir, ...)``.

FastAPI loads only when the app is built, so the CLI works without the serve extra."""

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # a large uncompressed DICOM radiograph fits


def create_app(run_dir, **kwargs):
    """See pneumoscope.serve.app.create_app."""
    from pneumoscope.serve.app import create_app as _create_app

    return _create_app(run_dir, **kwargs)


__all__ = ["create_app", "DEFAULT_MAX_UPLOAD_BYTES"]
