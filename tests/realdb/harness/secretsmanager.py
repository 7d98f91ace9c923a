"""A real Secrets Manager API for the Lambda target: moto's server, in its own process.

The generated Lambda function reads its database credentials from Secrets Manager at init
(db/secret.py). Its tests and bench/cold_start.py point the SDK at this server with
``AWS_ENDPOINT_URL`` and dummy credentials (``sdk_env``). It listens on 127.0.0.1 at a port below
the kernel's ephemeral range and records every request it serves, so a test counts the
GetSecretValue calls a function really made (``calls``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ports import free_port

from .processes import HOST

START_TIMEOUT_S = 30.0


class SecretsManagerServer:
    """``python -m moto.server`` on 127.0.0.1, recording its requests; a context manager."""

    region = "us-east-1"

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="poolwise-moto-"))
        self.recording = self.directory / "requests.jsonl"
        self.log = self.directory / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self._client: Any = None

    def start(self, attempts: int = 5) -> Self:
        for _ in range(attempts):  # a port taken between the probe and the bind: another one
            port = free_port(HOST)
            env = {
                **os.environ,
                "MOTO_ENABLE_RECORDING": "1",
                "MOTO_RECORDER_FILEPATH": str(self.recording),
            }
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.endpoint = f"http://{HOST}:{port}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.1)
            self._stop_process()
        raise RuntimeError(f"moto's server did not start:\n{self.log.read_text()[-2000:]}")

    def _stop_process(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def stop(self) -> None:
        self._stop_process()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def sdk_env(self) -> dict[str, str]:
        """What a process needs to reach this server with the AWS SDK, and nothing else."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "secretsmanager",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
        return self._client

    def create_secret(self, name: str, value: dict[str, Any]) -> str:
        """A secret holding value as JSON (as RDS stores database credentials); its ARN."""
        return self.client().create_secret(Name=name, SecretString=json.dumps(value))["ARN"]

    def put_secret(self, arn: str, value: dict[str, Any]) -> None:
        """A new current version of the secret, as a rotation's last step writes it."""
        self.client().put_secret_value(SecretId=arn, SecretString=json.dumps(value))

    def calls(self, action: str) -> int:
        """Requests for one Secrets Manager action (``GetSecretValue``) served so far."""
        if not self.recording.exists():
            return 0
        lines = self.recording.read_text().splitlines()
        targets = [json.loads(line)["headers"].get("X-Amz-Target") for line in lines]
        return targets.count(f"secretsmanager.{action}")
