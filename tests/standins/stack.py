"""All the local stand-ins at once: moto (S3, STS, IAM; its S3 answers in the documented forms, tests.standins.s3),
the Bedrock emulator, the S3 Vectors stand-in.

`start()` runs them in this process and returns the environment that points boto3 and the AWS CLI at them
through the standard AWS_ENDPOINT_URL_<SERVICE> variables, the way the scripts are pointed at them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import logging

from . import bedrock, iamsim, s3vectors, servicequotas, serve
from .s3 import MotoS3, S3Options, read_object
from . import tls as _tls

ACCOUNT_ID = "123456789012"  # moto's default account
REGION = "us-east-1"


@dataclass
class Stack:
    moto_url: str
    bedrock_url: str
    s3vectors_url: str
    env: dict[str, str]
    certificates: _tls.Certificates | None = None  # when the Bedrock emulator serves HTTPS (tls=True)
    s3: S3Options = field(default_factory=S3Options)  # how moto's S3 answers (tests.standins.s3)
    _stops: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        for stop in reversed(self._stops):
            stop()


def aws_env(moto_url: str, bedrock_url: str, s3vectors_url: str, servicequotas_url: str | None = None,
            iam_url: str | None = None) -> dict[str, str]:
    """Credentials and endpoints for a process that should reach the stand-ins only."""
    quotas = {"AWS_ENDPOINT_URL_SERVICE_QUOTAS": servicequotas_url} if servicequotas_url else {}
    return {
        **quotas,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ENDPOINT_URL_S3": moto_url,
        "AWS_ENDPOINT_URL_STS": moto_url,
        "AWS_ENDPOINT_URL_IAM": iam_url or moto_url,
        "AWS_ENDPOINT_URL_BEDROCK": bedrock_url,
        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": bedrock_url,
        "AWS_ENDPOINT_URL_S3VECTORS": s3vectors_url,
    }


def start(bedrock_options: dict | None = None, s3vectors_options: dict | None = None, *, tls: bool = False) -> Stack:
    """With tls=True the Bedrock emulator serves HTTPS with a throw-away CA that AWS_CA_BUNDLE names (botocore sends
    a Bedrock API key only over https)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log from moto's server
    moto = MotoS3().start()
    moto_url = moto.url
    certificates, stops = None, [moto.stop]
    if tls:
        folder = tempfile.TemporaryDirectory(prefix="standin-tls-")
        certificates = _tls.make(Path(folder.name))
        stops.append(folder.cleanup)
    emulator = serve(
        bedrock.make_app(s3_endpoint_url=moto_url, iam_endpoint_url=moto_url, region=REGION, account_id=ACCOUNT_ID,
                         options=bedrock_options, read_object=read_object),
        ssl_context=certificates.server_context() if certificates else None,
    )
    vectors = serve(s3vectors.make_app(region=REGION, account_id=ACCOUNT_ID, options=s3vectors_options))
    # Service Quotas: the Bedrock batch quotas at the values the emulator enforces
    quotas = serve(servicequotas.make_app(region=REGION, account_id=ACCOUNT_ID,
                                          quotas=servicequotas.quotas_for(bedrock_options)))
    iam = serve(iamsim.make_app(moto_url, account_id=ACCOUNT_ID))  # moto's IAM, with SimulatePrincipalPolicy (00)
    env = aws_env(moto_url, emulator.url, vectors.url, quotas.url, iam.url)
    if certificates:
        env["AWS_CA_BUNDLE"] = str(certificates.ca_file)
    return Stack(
        moto_url=moto_url,
        bedrock_url=emulator.url,
        s3vectors_url=vectors.url,
        env=env,
        certificates=certificates,
        s3=moto.options,
        _stops=[*stops, emulator.stop, vectors.stop, quotas.stop, iam.stop],
    )
