"""Keys, TLS and metrics of the disaggregated servers (issue 16): the router in front of the clients,
the role servers behind it.

Real processes on 127.0.0.1, the demo model, from ``disagg_harness.py`` (the trio of
``test_disagg_servers.py``, shared): a second router with an API key, TLS and a metrics port
over the trio's role servers (default run); role servers that need a key and TLS themselves,
behind a router that has the key and one that does not (slow). Certificates come from
``test_serving_security._make_certs``; the reference tokens are the colocated engine's.
"""

from __future__ import annotations

import ssl
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg_harness import FLAGS, MAX_TOKENS, Proc, metric, prompt_ids
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

# The trio of processes and the colocated reference are shared with test_disagg_servers.py.
pytest_plugins = ["disagg_harness"]


@pytest.mark.slow  # three more processes; the default run covers the router's side above
def test_role_servers_with_api_key_tls_and_metrics(colocated_tokens, tmp_path):
    """Role servers that need a key and TLS: a router with --backend-api-key and --backend-tls-ca
    serves through them; one without the key sees no server up (health NOT_SERVING)."""
    from test_serving_security import _make_certs

    _make_certs(tmp_path)
    tls = ("--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"))
    env = {"ENERGON_API_KEY": "backend-key"}
    servers = [Proc("serve", "--role", role, *FLAGS, *tls, "--metrics-port", "0", env=env)
               for role in ("prefill", "decode")]
    procs = list(servers)
    try:
        for p in servers:
            p.wait_ports(120)
        prefill, decode = servers
        targets = ("--prefill", prefill.target, "--decode", decode.target, "--backend-tls-ca", str(tmp_path / "ca.pem"))
        router = Proc("router", *targets, "--backend-api-key", "backend-key", "--probe-interval", "0.2")
        keyless = Proc("router", *targets, "--probe-interval", "0.2")
        procs += [router, keyless]
        router.wait_ports(120)
        keyless.wait_ports(120)
        with grpc.insecure_channel(router.target) as ch:
            responses = list(pb_grpc.InferenceStub(ch).Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(45)),
                                   params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)), timeout=300))
        assert [t for r in responses for t in r.token_ids] == colocated_tokens[45][0]
        with grpc.insecure_channel(keyless.target) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "refuses the router's key" in keyless.log_path.read_text(errors="replace")
        assert metric(decode.metrics_text(10), "energon_kv_pulls_total") == 1
        assert metric(prefill.metrics_text(10), "energon_kv_pages_used") == 0
    finally:
        for p in reversed(procs):
            p.stop()


def test_router_api_key_tls_and_metrics(trio, colocated_tokens, tmp_path):
    """A second router over the same servers: clients need the key (health excepted) and TLS, on
    gRPC and HTTP; the HTTP front end reaches the router through its plaintext loopback port."""
    import httpx
    from test_serving_security import _make_certs

    _make_certs(tmp_path)
    router = Proc("router", "--prefill", trio.prefill.target, "--decode", trio.decode.target, "--http-port", "0",
                  "--metrics-port", "0", "--tls-cert", str(tmp_path / "server.pem"), "--tls-key",
                  str(tmp_path / "server.key"), env={"ENERGON_API_KEY": "router-key"})
    try:
        router.wait_ports(120)
        key = (("authorization", "Bearer router-key"),)
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(16)),
                                 params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        creds = grpc.ssl_channel_credentials(root_certificates=(tmp_path / "ca.pem").read_bytes())
        with grpc.secure_channel(router.target, creds) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # no key needed
            stub = pb_grpc.InferenceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            responses = list(stub.Generate(req, timeout=300, metadata=key))
            got = ([t for r in responses for t in r.token_ids], "".join(r.text for r in responses))
            assert got == colocated_tokens[16]
        with grpc.insecure_channel(router.target) as plain:  # plaintext to the TLS port
            with pytest.raises(grpc.RpcError):
                list(pb_grpc.InferenceStub(plain).Generate(req, timeout=10, metadata=key))
        url = f"https://127.0.0.1:{router.http_port}/v1/completions"
        body = dict(prompt=prompt_ids(45), max_tokens=MAX_TOKENS, temperature=0.0)
        with httpx.Client(verify=ssl.create_default_context(cafile=tmp_path / "ca.pem"), timeout=300) as http:
            assert http.post(url, json=body).status_code == 401
            r = http.post(url, json=body, headers={"Authorization": "Bearer router-key"})
            assert r.status_code == 200, r.text + router.log_path.read_text(errors="replace")
            assert r.json()["choices"][0]["text"] == colocated_tokens[45][1]
        deadline = time.monotonic() + 30  # a call is counted when its handler returns, just after its last response
        while metric(text := router.metrics_text(10), 'energon_router_requests_total{outcome="OK"}', 0.0) < 2:
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        time.sleep(0.5)
        text = router.metrics_text(10)
        assert metric(text, 'energon_router_requests_total{outcome="OK"}') == 2  # one gRPC, one HTTP
        assert metric(text, "energon_router_time_to_first_token_seconds_count") == 2
        assert metric(text, "energon_router_handoff_seconds_count") == 2
        assert metric(text, f'energon_router_backend_up{{role="prefill",target="{trio.prefill.target}"}}') == 1
        assert metric(text, f'energon_router_backend_in_flight{{role="decode",target="{trio.decode.target}"}}') == 0
    finally:
        assert router.stop()
    trio.wait_pages_free()
