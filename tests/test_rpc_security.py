"""gRPC between engines, the controller and workers: the deployment token and TLS.

Real grpc.aio servers on 127.0.0.1 (as in test_expert_service); the TLS case uses
a self-signed certificate for 127.0.0.1 that the test makes with ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_expert_service import LoopThread

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.experts import rpc
from elasticmoe.experts.rpc import RpcSecurity, open_channel
from elasticmoe.experts.service import ExpertServicer, ExpertStore, serve
from elasticmoe.model.init_model import init_model

TOKEN = "t0ken-for-this-deployment"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model("mixtral", "tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def start(loop: LoopThread, model_dir: Path, security: RpcSecurity, worker_id: str = "w0"):
    store = ExpertStore(model_dir, 4, worker_id=worker_id)
    servicer = ExpertServicer(store, num_threads=1)
    server, port = loop.run(serve(store, servicer=servicer, security=security))
    return server, servicer, f"127.0.0.1:{port}"


def calls(stub: expert_pb2_grpc.ExpertServiceStub) -> dict[str, object]:
    ref = expert_pb2.ExpertRef(layer=0, expert=1)
    return {
        "Health": lambda: stub.Health(expert_pb2.HealthRequest(), timeout=10),
        "LoadExperts": lambda: stub.LoadExperts(
            expert_pb2.LoadExpertsRequest(experts=[ref]), timeout=30
        ),
        "FetchExpert": lambda: list(stub.FetchExpert(ref, timeout=10)),
        "UnloadExperts": lambda: stub.UnloadExperts(
            expert_pb2.UnloadExpertsRequest(experts=[ref]), timeout=10
        ),
        # the router's bidirectional stream: refused before any frame is read
        "ForwardStream": lambda: list(
            stub.ForwardStream(iter([expert_pb2.TokenFrame(seq=1)]), timeout=10)
        ),
    }


def test_every_rpc_needs_the_deployment_token(loop, model_dir):
    server, servicer, address = start(loop, model_dir, RpcSecurity(token=TOKEN))
    try:
        for who in (RpcSecurity(), RpcSecurity(token="another-deployments-token")):
            with open_channel(address, who) as channel:
                for name, call in calls(expert_pb2_grpc.ExpertServiceStub(channel)).items():
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                    assert "deployment token" in err.value.details()
        with open_channel(address, RpcSecurity(token=TOKEN)) as channel:
            ok = calls(expert_pb2_grpc.ExpertServiceStub(channel))
            assert ok["Health"]().status == "SERVING"
            ok["LoadExperts"]()
            assert len(ok["FetchExpert"]()) >= 2  # gate_up and down chunks
            assert ok["UnloadExperts"]().num_unloaded == 1
            (result,) = ok["ForwardStream"]()  # an empty frame: answered, not refused
            assert result.seq == 1 and "hidden" in result.error
    finally:
        loop.run(server.stop(grace=1))
        servicer.close()


def test_peer_copies_carry_the_token(loop, model_dir, monkeypatch):
    """A worker copying from a peer presents the token from its environment."""
    monkeypatch.setenv(rpc.TOKEN_ENV, TOKEN)
    sec = RpcSecurity.from_env()
    a_srv, a_svc, a = start(loop, model_dir, sec, "a")
    b_srv, b_svc, b = start(loop, model_dir, sec, "b")
    try:
        ref = expert_pb2.ExpertRef(layer=0, expert=2)
        with open_channel(a) as ca, open_channel(b) as cb:
            info = (
                expert_pb2_grpc.ExpertServiceStub(ca)
                .LoadExperts(expert_pb2.LoadExpertsRequest(experts=[ref]), timeout=30)
                .experts[0]
            )
            got = expert_pb2_grpc.ExpertServiceStub(cb).LoadExperts(
                expert_pb2.LoadExpertsRequest(experts=[ref], source=a, checksums=[info.checksum]),
                timeout=30,
            )
            assert got.experts[0].checksum == info.checksum
    finally:
        for srv, svc in ((a_srv, a_svc), (b_srv, b_svc)):
            loop.run(srv.stop(grace=1))
            svc.close()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elasticmoe-worker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_from_the_environment(loop, model_dir, tmp_path):
    cert, key = _self_signed(tmp_path)
    env = {
        rpc.TOKEN_ENV: TOKEN,
        rpc.TLS_CERT_ENV: str(cert),
        rpc.TLS_KEY_ENV: str(key),
        rpc.TLS_CA_ENV: str(cert),
    }
    sec = RpcSecurity.from_env(env)
    assert sec.tls and "t0ken" not in repr(sec)
    server, servicer, address = start(loop, model_dir, sec)
    try:
        with open_channel(address, sec) as channel:
            health = expert_pb2_grpc.ExpertServiceStub(channel).Health(
                expert_pb2.HealthRequest(), timeout=10
            )
            assert health.status == "SERVING"
        # a plaintext client gets no answer from a TLS server
        with open_channel(address, RpcSecurity(token=TOKEN)) as channel:
            with pytest.raises(grpc.RpcError) as err:
                expert_pb2_grpc.ExpertServiceStub(channel).Health(
                    expert_pb2.HealthRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(server.stop(grace=1))
        servicer.close()


def test_security_settings_are_checked():
    with pytest.raises(ValueError, match="whitespace"):
        RpcSecurity(token=" padded ")
    with pytest.raises(ValueError, match="both"):
        RpcSecurity(tls_cert=b"x")
    with pytest.raises(ValueError, match="cannot read"):
        RpcSecurity.from_env({rpc.TLS_CA_ENV: "/nonexistent/ca.pem"})
    with rpc.fresh_token_in_environment() as token:
        import os

        assert os.environ[rpc.TOKEN_ENV] == token and len(token) >= 32
    assert rpc.TOKEN_ENV not in os.environ
