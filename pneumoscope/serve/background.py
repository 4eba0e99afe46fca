"""Run an app under a real uvicorn server in a background thread (tests, benchmarks,
notebooks): ``with BackgroundServer(create_app(run)) as server: server.url``."""

from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        start_timeout_s: float = 300.0,
    ):
        import uvicorn

        # Bound here (port 0: the OS picks a free one) and handed to uvicorn, so no other
        # process can take the port between choosing it and listening on it.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.start_timeout_s = start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="uvicorn"
        )

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:  # set once the lifespan (model load) has finished
            if not self.thread.is_alive():
                self.sock.close()
                raise RuntimeError("the server stopped during start-up (see its log above)")
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the server did not start within {self.start_timeout_s:.0f} s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
