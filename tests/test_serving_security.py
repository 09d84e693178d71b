"""API keys, TLS and mutual TLS against a real server process (mock engine).

Certificates are made in the test: with the ``cryptography`` package when it
is installed, otherwise with the ``openssl`` command; with neither the test
fails (it is never skipped).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2
from serving_harness import ServerProcess

from serving.client import ClientConfig, InferenceClient, sampling_params

pytestmark = pytest.mark.timeout(120)

KEY = "sk-test-3f9a7c1e5b2d4068a1c3e5f7"


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _generate_ids(config: ClientConfig) -> list[int]:
    async with InferenceClient(config) as client:
        resps = await client.generate_all("5 6", sampling_params(max_tokens=3, temperature=0.0), timeout=30)
    return [t for r in resps for t in r.token_ids]


async def _status_of(coro_fn, config: ClientConfig) -> grpc.StatusCode:
    async with InferenceClient(config) as client:
        try:
            await coro_fn(client)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_api_key_required_everywhere_but_health_and_never_logged() -> None:
    with ServerProcess("--log-level", "DEBUG", env={"ENERGON_API_KEY": KEY}) as srv:
        srv.wait_serving()  # health needs no key
        good = ClientConfig(target=srv.target, api_key=KEY)
        assert _run(_generate_ids(good)) == [7, 8, 9]
        calls = {
            "generate": lambda c: c.generate_all("1", sampling_params(max_tokens=1), timeout=10),
            "model_info": lambda c: c.model_info(timeout=10),
            "tokenize": lambda c: c.tokenize("1", timeout=10),
            "embed": lambda c: c.embed(["1"], timeout=10),
        }
        for bad_key in (None, "wrong", KEY[:-1], KEY + "x"):
            cfg = ClientConfig(target=srv.target, api_key=bad_key)
            for name, fn in calls.items():
                assert _run(_status_of(fn, cfg)) == grpc.StatusCode.UNAUTHENTICATED, (name, bad_key)
            assert _run(_status_of(lambda c: c.health(timeout=10), cfg)) == grpc.StatusCode.OK
        # Reflection is not health: it needs the key too.
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        with grpc.insecure_channel(srv.target) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as e:
                list(stub.ServerReflectionInfo(iter([req]), timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            auth = (("authorization", f"Bearer {KEY}"),)
            [ok] = list(stub.ServerReflectionInfo(iter([req]), timeout=10, metadata=auth))
            assert "energon.v1.Inference" in {s.name for s in ok.list_services_response.service}
        # The HTTP API takes the same key; /health, /version and /metrics need none.
        with httpx.Client(base_url=srv.http_url, timeout=10) as h:
            body = {"prompt": "5 6", "max_tokens": 3, "temperature": 0}
            for bad in (None, "wrong", KEY[:-1], KEY + "x"):
                headers = {} if bad is None else {"Authorization": f"Bearer {bad}"}
                for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize")):
                    r = h.request(method, path, json=body if method == "POST" else None, headers=headers)
                    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, bad)
            r = h.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert r.json()["choices"][0]["text"] == " 7 8 9"
            assert [h.get(p).status_code for p in ("/health", "/version", "/metrics")] == [200, 200, 200]
        srv.signal(15)
        assert srv.wait_exit(30) == 0
        log = srv.log()
    assert "serving energon.v1.Inference" in log  # the log is there, and
    assert KEY not in log and KEY[:-1] not in log  # holds no key


def test_config_reprs_hide_the_key() -> None:
    from serving.server import ServerConfig

    assert KEY not in repr(ServerConfig(api_key=KEY))
    assert KEY not in repr(ClientConfig(api_key=KEY))


# -- certificates ---------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.fail("neither the cryptography package nor the openssl command can make test certificates")
        _make_certs_openssl(d)
        return
    _make_certs_cryptography(d)


def _make_certs_openssl(d: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=energon-test-ca", cwd=d,
    )  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
            "-subj", f"/CN=energon-test-{who}", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=d,
        )  # fmt: skip


def _make_certs_cryptography(d: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write(name: str, key, cert) -> None:
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def build(cn: str, key, issuer_name, issuer_key, extensions):
        b = x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        b = b.issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        b = b.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "energon-test-ca")])
    ca = build("energon-test-ca", ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    write("ca", ca_key, ca)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    for who, usage, extra in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH, [(san, False)]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        exts = [(x509.ExtendedKeyUsage([usage]), False), *extra]
        write(who, key, build(f"energon-test-{who}", key, ca_name, ca_key, exts))


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _make_certs(d)
    return d


def _wait_serving_tls(config: ClientConfig) -> None:
    async def poll() -> None:
        async with InferenceClient(config) as client:
            while True:
                try:
                    if await client.health(timeout=5) == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass  # not up yet
                await asyncio.sleep(0.1)

    _run(poll())


def test_tls_server_accepts_tls_clients_and_refuses_plaintext(certs: Path) -> None:
    with ServerProcess("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")) as srv:
        srv.wait_ports()
        tls = ClientConfig(target=srv.target, tls_ca=certs / "ca.pem")
        _wait_serving_tls(tls)
        assert _run(_generate_ids(tls)) == [7, 8, 9]
        plain = ClientConfig(target=srv.target)
        assert _run(_status_of(lambda c: c.model_info(timeout=5), plain)) == grpc.StatusCode.UNAVAILABLE
        untrusted = ClientConfig(target=srv.target, tls_ca=certs / "client.pem")  # not the CA that signed the server
        assert _run(_status_of(lambda c: c.model_info(timeout=5), untrusted)) == grpc.StatusCode.UNAVAILABLE
        # The HTTP API serves TLS with the same files, and nothing in plain text.
        url = f"https://127.0.0.1:{srv.http_port}"
        with httpx.Client(base_url=url, verify=_ssl_context(certs), timeout=10) as h:
            r = h.post("/v1/completions", json={"prompt": "5 6", "max_tokens": 3, "temperature": 0})
            assert r.json()["choices"][0]["text"] == " 7 8 9"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{srv.http_port}/health", timeout=5)


def test_mutual_tls_requires_a_client_certificate(certs: Path) -> None:
    args = ("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"))
    args += ("--tls-client-ca", str(certs / "ca.pem"))
    with ServerProcess(*args) as srv:
        srv.wait_ports()
        mtls = ClientConfig(
            target=srv.target, tls_ca=certs / "ca.pem", tls_cert=certs / "client.pem", tls_key=certs / "client.key"
        )
        _wait_serving_tls(mtls)
        assert _run(_generate_ids(mtls)) == [7, 8, 9]
        no_cert = ClientConfig(target=srv.target, tls_ca=certs / "ca.pem")
        assert _run(_status_of(lambda c: c.model_info(timeout=5), no_cert)) == grpc.StatusCode.UNAVAILABLE
        url = f"https://127.0.0.1:{srv.http_port}"
        with httpx.Client(base_url=url, verify=_ssl_context(certs, client=True), timeout=10) as h:
            assert h.get("/health").status_code == 200
        with pytest.raises(httpx.HTTPError), httpx.Client(base_url=url, verify=_ssl_context(certs), timeout=5) as h:
            h.get("/health")


def _ssl_context(certs: Path, client: bool = False):
    import ssl

    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client:
        ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    return ctx


def test_open_channel_refuses_half_a_client_identity(certs: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ClientConfig(tls_ca=certs / "ca.pem", tls_cert=certs / "client.pem")
    with pytest.raises(ValueError, match="needs tls_ca"):
        ClientConfig(tls_cert=certs / "client.pem", tls_key=certs / "client.key")
