"""TLS on the gateway's public ports when a certificate is configured (``CHARAI_TLS_CERT_FILE``,
``CHARAI_TLS_KEY_FILE``): gRPC, gRPC-web, REST, media and health all over TLS with one
certificate; plaintext is refused; the HTTP bridge still reaches the servicer (over its own
loopback port, which still demands a token); bad files stop start-up naming the setting.

The certificate is self-signed, made for the test by ``openssl`` (the ``cryptography`` package
is not a dependency), for ``localhost`` and ``127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypedDict

import aiohttp
import grpc
import pydantic
import pytest
import pytest_asyncio
from charai.gateway.app import GatewayApp
from charai.gateway.settings import Settings as GatewaySettings
from charai.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.security.harness import (
    TOKEN_A,
    Charai,
    bearer,
    grpc_unary,
    grpcweb,
    running_charai,
    tts_request,
)


def make_certificate(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_charai(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Charai, Path]]:
    tmp = Path(tmp_path_factory.mktemp("tls"))
    cert, key = make_certificate(tmp)
    async with running_charai(
        tmp, gateway={"tls_cert_file": cert, "tls_key_file": key}, with_worker=True
    ) as running:
        await running.start_worker()
        yield running, cert


LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses listening on TCP ``port`` (from /proc/net/tcp and tcp6)."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(ipaddress.ip_address(ordered))
    return found


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def test_grpc_over_tls_and_plaintext_refused(tls_charai: tuple[Charai, Path]) -> None:
    charai, cert = tls_charai
    port = charai.gateway.grpc_port
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    for host in ("localhost", "127.0.0.1"):
        async with grpc.aio.secure_channel(f"{host}:{port}", credentials) as channel:
            answer = await grpc_unary(channel, "CreateTask", tts_request(), bearer(TOKEN_A))
            assert answer.code == grpc.StatusCode.OK, answer.message
            # Still the same authentication behind TLS.
            anonymous = await grpc_unary(channel, "CreateTask", tts_request(), [])
            assert anonymous.code == grpc.StatusCode.UNAUTHENTICATED
    # Plaintext to the TLS port, and TLS without trusting the certificate, both fail.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
        answer = await grpc_unary(
            plain, "GetTask", task_service_pb2.GetTaskRequest(), bearer(TOKEN_A), timeout=3
        )
        assert answer.code == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials()) as untrusted:
        answer = await grpc_unary(
            untrusted, "GetTask", task_service_pb2.GetTaskRequest(), bearer(TOKEN_A), timeout=3
        )
        assert answer.code == grpc.StatusCode.UNAVAILABLE


async def test_http_port_over_tls_grpc_web_rest_and_media(tls_charai: tuple[Charai, Path]) -> None:
    charai, cert = tls_charai
    context = client_context(cert)
    base = f"https://localhost:{charai.gateway.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz", ssl=context) as resp:
            assert resp.status == 200
        # gRPC-web over TLS is bridged to the servicer (through the loopback port).
        created = await grpcweb(http, base, "CreateTask", tts_request(text="over tls"), TOKEN_A, ssl=context)
        assert created.code == grpc.StatusCode.OK, created.message
        task = created.first(task_service_pb2.CreateTaskResponse).task
        refused = await grpcweb(http, base, "CreateTask", tts_request(), None, ssl=context)
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED
        body = {
            "type": "tts_generation",
            "payload": {"characterId": "c1", "text": "hi", "voiceStyle": "tongtong"},
        }
        async with http.post(
            f"{base}/api/tasks", json=body, headers={"Authorization": f"Bearer {TOKEN_A}"}, ssl=context
        ) as resp:
            assert resp.status == 201
        # Media URLs are written with https, and load over TLS without a header.
        stub = task_service_pb2_grpc.TaskServiceStub(charai.gateway._loopback)  # type: ignore[arg-type]
        async for response in stub.WatchTask(
            task_service_pb2.WatchTaskRequest(id=task.id), metadata=bearer(TOKEN_A), timeout=20
        ):
            if response.event.task.status == task_pb2.TASK_STATUS_COMPLETED:
                url = response.event.task.tts_result.audio_url
                break
        else:
            raise AssertionError("the task did not complete")
        assert url.startswith(f"https://127.0.0.1:{charai.gateway.http_port}/media/")
        async with http.get(url, ssl=context) as resp:
            assert resp.status == 200 and (await resp.read())[:4] == b"RIFF"
        # Plain HTTP to the TLS port gets nothing.
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{charai.gateway.http_port}/healthz") as resp:
                await resp.read()


async def test_the_bridge_port_is_loopback_and_still_needs_a_token(tls_charai: tuple[Charai, Path]) -> None:
    charai, _ = tls_charai
    assert charai.gateway.bridge_port not in (0, charai.gateway.grpc_port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{charai.gateway.bridge_port}") as bridge:
        anonymous = await grpc_unary(bridge, "CreateTask", tts_request(), [])
        assert anonymous.code == grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(bridge).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    addresses = listening_addresses(charai.gateway.bridge_port)
    assert addresses and all(
        a.is_loopback or getattr(a, "ipv4_mapped", None) == LOOPBACK for a in addresses
    ), addresses


class GatewayBase(TypedDict):
    """Settings every gateway of the test below shares (typed, so ``**`` passes them checked)."""

    data_dir: Path
    nats_url: str
    gateway_grpc_addr: str


class TlsFiles(TypedDict):
    tls_cert_file: Path
    tls_key_file: Path


async def test_bad_tls_settings_stop_start_up_naming_the_setting(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    other_cert, _ = make_certificate(tmp_path, "other")
    base: GatewayBase = {
        "data_dir": tmp_path,
        "nats_url": "nats://127.0.0.1:1",
        "gateway_grpc_addr": "127.0.0.1:0",
    }
    with pytest.raises(pydantic.ValidationError, match="CHARAI_TLS_KEY_FILE go together"):
        GatewaySettings(**base, tls_cert_file=cert)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases: dict[str, TlsFiles] = {
        "CHARAI_TLS_CERT_FILE": {"tls_cert_file": tmp_path / "missing.crt", "tls_key_file": key},
        "CHARAI_TLS_KEY_FILE": {"tls_cert_file": cert, "tls_key_file": not_pem},
        "matching private key": {"tls_cert_file": other_cert, "tls_key_file": key},
    }
    for words, files in cases.items():
        with pytest.raises(SystemExit) as stopped:
            await GatewayApp(
                GatewaySettings(**base, api_keys=pydantic.SecretStr(f"{TOKEN_A}=a"), **files)
            ).start()
        message = str(stopped.value)
        assert words in message, message
        assert "PRIVATE KEY" not in message and key.read_text()[40:80] not in message
