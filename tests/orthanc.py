"""A real PACS for the DICOM tests: Debian's Orthanc (with the DICOMweb plugin) on 127.0.0.1, with a temporary
configuration and storage, started by the test and stopped after it.

Tests that need it skip, with the install command, where Orthanc or dcmtk is absent; under CI (``CI=true``) a
missing Orthanc is a failure instead, since ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

INSTALL = "apt-get install -y orthanc orthanc-dicomweb dcmtk"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(*programs: str) -> None:
    """Skip (or, under CI, fail) unless every program is on PATH."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        message = f"{', '.join(missing)} not found: {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)


@dataclass
class Orthanc:
    """A running Orthanc: its DICOM AE title and port, its REST and DICOMweb URLs."""

    root: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance with its main tags (``/instances?expand``)."""
        return self.get("/instances?expand")

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def add_modality(self, name: str, aet: str, port: int) -> None:
        """Tell Orthanc where a DICOM node listens (so it accepts it and can send to it)."""
        body = json.dumps({"AET": aet, "Host": "127.0.0.1", "Port": port}).encode()
        request = urllib.request.Request(f"{self.url}/modalities/{name}", data=body, method="PUT")
        urllib.request.urlopen(request, timeout=10).read()


def start_orthanc(root: Path) -> Orthanc:
    """Write a configuration under ``root`` and start Orthanc on free loopback ports; wait until it answers."""
    need("Orthanc")
    root.mkdir(parents=True, exist_ok=True)
    server = Orthanc(root, free_port(), free_port())
    config = {
        "Name": "boneage-test-pacs",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": server.aet,
        "RemoteAccessAllowed": False,  # HTTP from this machine only
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "HttpTimeout": 10,
        "StableAge": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }
    (root / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = (root / "orthanc.log").open("wb")
    server.process = subprocess.Popen(["Orthanc", "--logdir=" + str(root), str(root / "orthanc.json")],
                                      stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.get("/system")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            if server.process.poll() is not None or time.monotonic() > deadline:
                stop_orthanc(server)
                raise RuntimeError(f"Orthanc did not start: see {root / 'orthanc.log'}") from None
            time.sleep(0.2)


def stop_orthanc(server: Orthanc) -> None:
    if server.process is not None and server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh, empty Orthanc for one test."""
    server = start_orthanc(tmp_path / "orthanc")
    try:
        yield server
    finally:
        stop_orthanc(server)
