"""The image's HEALTHCHECK: exit 0 while threadbot's `/healthz` answers 200, else 1.

It runs with any Python (the standard library only), and reads the port from threadbot's
own settings where this Python has them, as the image's does; it prints one line, which
`docker inspect` shows. Liveness only: whether threadbot can serve is `/readyz`'s question.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = "8080"  # HTTP_PORT's default (bot/config.py)
TIMEOUT_S = 4.0  # under the HEALTHCHECK's --timeout, so a hang still prints its line


def http_port() -> str:
    """The port threadbot serves on, read as threadbot reads it (a port set in the team's
    file or in `.env` counts too); where this Python lacks threadbot, HTTP_PORT."""
    try:
        from bot.config import load_settings

        return str(load_settings().http_port)
    except Exception:  # no threadbot here, or settings it refuses too (it stopped at start)
        return os.environ.get("HTTP_PORT") or DEFAULT_PORT


def main() -> int:
    port = http_port()
    if port == "0":
        print("HTTP_PORT=0: the health endpoint is off; nothing to check")
        return 0
    url = f"http://127.0.0.1:{port}/healthz"
    # No proxy: an HTTP_PROXY meant for the hub must not carry a loopback request away.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError as error:
        print(f"{url}: {error}")
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
