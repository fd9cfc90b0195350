"""Records every AWS call a process makes, for the test that checks the caller policy covers the steps.

A process started with PYTHONPATH=tests/record_calls and RECORD_AWS_CALLS=<file> appends one JSON line per
botocore call to <file>: the service, the operation and its scalar parameters (no payloads). With
RECORD_AWS_CLIENTS=<file> too, it appends the service of each client it makes to that file, a line each. Without
RECORD_AWS_CALLS this does nothing.
"""

import json
import os
import threading

_PATH = os.environ.get("RECORD_AWS_CALLS")

if _PATH:
    import botocore.session

    _lock = threading.Lock()
    _create_client = botocore.session.Session.create_client

    def _small(value):
        if isinstance(value, (str, int, float, bool)) or value is None:
            return True
        try:
            return len(json.dumps(value)) < 2000
        except (TypeError, ValueError):
            return False

    def create_client(self, service_name, *args, **kwargs):
        client = _create_client(self, service_name, *args, **kwargs)
        service = client.meta.service_model.service_name
        if os.environ.get("RECORD_AWS_CLIENTS"):
            with _lock, open(os.environ["RECORD_AWS_CLIENTS"], "a", encoding="utf-8") as fh:
                fh.write(service + "\n")

        def record(params, model, context=None, **_):
            line = {"service": service, "operation": model.name,
                    "params": {k: v for k, v in params.items() if _small(v)},
                    "presign": bool((context or {}).get("is_presign_request"))}
            with _lock, open(_PATH, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")

        client.meta.events.register("provide-client-params.*.*", record)
        return client

    botocore.session.Session.create_client = create_client
