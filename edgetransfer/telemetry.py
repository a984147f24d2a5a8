"""Third-party usage telemetry stays off while edgetransfer calls NNCF and OpenVINO's converter.

Both send anonymous usage statistics to Google Analytics unless the user opted out (through the
`openvino_telemetry` package), from a child process the interpreter waits for at exit. edgetransfer is
made for lines without internet and fetches nothing at run time; it sends nothing either. Offline, the
wait is the harm: `edgetransfer demo --quick` finished its work and then hung at exit for over 15
minutes in a DNS lookup of the analytics host (2026-12-03, 2-core Xeon VM without internet).

The tools read their own switch when they set telemetry up: NNCF when it is first imported, OpenVINO's
converter on every `convert_model`. Both decline in a CI environment (`CI=true`), NNCF also with
`NNCF_CI` set; `telemetry_off()` sets both around those calls only, and puts back what was there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

#: the environment the tools read as "do not send" (openvino_telemetry's CI check, NNCF's own)
_SWITCHES = {"CI": "true", "NNCF_CI": "1"}


@contextlib.contextmanager
def telemetry_off() -> Iterator[None]:
    """Import and call NNCF / `openvino.convert_model` inside this; the environment is restored after."""
    saved = {name: os.environ.get(name) for name in _SWITCHES}
    os.environ.update(_SWITCHES)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
