#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when the launcher answers GET /health with 200.

The port is $PORT (the launchers read it too). The host is $HEALTHCHECK_HOST if set, else
127.0.0.1 and then $HOSTNAME: TGI's launcher binds --hostname, which defaults to $HOSTNAME, and
inside a container that is the container's own name, not the loopback address.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def healthy(host: str, port: str, timeout: float = 5.0) -> bool:
    # NOTE: no proxies: an http_proxy in the container's environment must not catch the probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> int:
    port = os.environ.get("PORT") or "8080"
    explicit = os.environ.get("HEALTHCHECK_HOST")
    hosts = [explicit] if explicit else ["127.0.0.1", os.environ.get("HOSTNAME", "")]
    return 0 if any(healthy(h, port) for h in hosts if h) else 1


if __name__ == "__main__":
    sys.exit(main())
