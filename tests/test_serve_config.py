"""Who may do what: keys for /v1 and /admin, secrets from the environment or files; and
the bounds of the serving settings."""

from __future__ import annotations

import socket

import pytest
import redis

from elasticmoe.serve.app import key_matches
from elasticmoe.serve.ingress import direct_ingress_environment
from elasticmoe.serve.server import (
    check_port_free,
    direct_ingress,
    is_loopback,
    load_serve_config,
)


def load(environ=None, **settings):
    return load_serve_config(None, {"model": "default", **settings}, environ or {})


def test_keys_come_from_the_environment_or_a_file(tmp_path):
    cfg = load({"ELASTICMOE_API_KEYS": "sk-aaaaaaaa,sk-bbbbbbbb"})
    assert cfg.api_keys == ["sk-aaaaaaaa", "sk-bbbbbbbb"] and cfg.admin_api_keys == []
    keys = tmp_path / "admin-keys"
    keys.write_text("sk-admin-1\nsk-admin-2\n")  # a Secret volume's file, trailing newline
    cfg = load({"ELASTICMOE_ADMIN_API_KEYS_FILE": str(keys)})
    assert cfg.admin_api_keys == ["sk-admin-1", "sk-admin-2"] and cfg.api_keys == []
    with pytest.raises(ValueError, match=r"ELASTICMOE_API_KEYS_FILE=.*cannot read"):
        load({"ELASTICMOE_API_KEYS_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize("key", [" sk-padded-key", "sk-padded-key ", "sk-tab\t", "short"])
def test_padded_empty_or_short_keys_are_refused_at_start(key):
    with pytest.raises(ValueError, match=r"api_keys") as err:
        load(api_keys=[key])
    assert "whitespace" in str(err.value) or "at least 8" in str(err.value)
    with pytest.raises(ValueError, match="admin_api_keys"):
        load(admin_api_keys=[key])


def test_admin_never_starts_open_on_the_network():
    assert load(host="127.0.0.1").admin_api_keys == []  # loopback: open is fine
    for host in ("0.0.0.0", "10.1.2.3", "::", "my-host"):
        with pytest.raises(ValueError, match="ELASTICMOE_ADMIN_API_KEYS") as err:
            load(host=host)
        assert f"host={host!r}" in str(err.value)
    assert load(host="0.0.0.0", admin_api_keys=["sk-admin-key"]).host == "0.0.0.0"
    assert load(host="0.0.0.0", allow_open_admin=True).allow_open_admin
    assert is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_key_comparison():
    keys = ["sk-aaaaaaaa", "sk-bbbbbbbb"]
    assert key_matches("Bearer sk-bbbbbbbb", keys)
    assert key_matches("bearer sk-aaaaaaaa", keys)
    for header in ("", "Bearer", "Bearer ", "Basic sk-aaaaaaaa", "Bearer sk-aaaaaaa",
                   "Bearer sk-aaaaaaaab", "sk-aaaaaaaa"):  # fmt: skip
        assert not key_matches(header, keys), header


def test_redis_password_from_the_environment_is_percent_encoded():
    password = "p@ss:w/rd%?#"
    cfg = load({"ELASTICMOE_REDIS_PASSWORD": password}, state_store="rediss://cache:6380/2")
    assert password not in cfg.state_store
    # redis-py decodes it back to the password, host and db intact
    kwargs = redis.connection.parse_url(cfg.state_store)
    assert kwargs["password"] == password and kwargs["host"] == "cache"
    assert kwargs["port"] == 6380 and kwargs["db"] == 2
    assert cfg.state_store.startswith("rediss://")
    # a URL that carries its own password keeps it; memory:// ignores it
    given = load({"ELASTICMOE_REDIS_PASSWORD": "x"}, state_store="redis://:mine@h:1/0")
    assert given.state_store == "redis://:mine@h:1/0"
    assert load({"ELASTICMOE_REDIS_PASSWORD": "x"}).state_store is None


@pytest.mark.parametrize("value", [0, 2049])
def test_max_in_flight_stays_within_what_the_replica_holds(value):
    # over 2,048 Ray Serve itself would turn requests away, before our 429
    with pytest.raises(ValueError, match="max_in_flight"):
        load(max_in_flight=value)
    assert load(max_in_flight=2048).max_in_flight == 2048


@pytest.mark.parametrize("value", [0, -1, 1025])
def test_stream_interval_is_bounded(value):
    with pytest.raises(ValueError, match="stream_interval"):
        load(stream_interval=value)
    assert load(stream_interval=8).stream_interval == 8


def test_ingress_is_direct_only_where_the_ray_instance_was_started_for_it():
    with pytest.raises(ValueError, match="ingress"):
        load(ingress="both")
    # direct on a cluster started without it is refused at load, naming the setting
    with pytest.raises(ValueError, match=r"ingress: direct.*port 8000"):
        load(ingress="direct", ray_address="ray://head:10001")
    with pytest.raises(ValueError, match=r"ingress: direct.*RAY_SERVE_ENABLE_DIRECT_INGRESS"):
        load({"RAY_ADDRESS": "head:6379"}, ingress="direct")
    # auto is direct where serve starts Ray, the proxy where it joins a cluster
    assert direct_ingress(load(), {}) is True
    assert direct_ingress(load(ray_address="auto"), {}) is False
    assert direct_ingress(load(), {"RAY_ADDRESS": "head:6379"}) is False
    assert direct_ingress(load(ingress="proxy"), {}) is False
    # ... unless that cluster was started with direct ingress for this port (the
    # operator's head pod: its `ray start` and `elasticmoe serve` share the variables)
    head_pod = direct_ingress_environment(8000)
    assert direct_ingress(load(ray_address="auto"), head_pod) is True
    assert load(head_pod, ingress="direct", ray_address="auto").ingress == "direct"
    assert direct_ingress(load(ray_address="auto", port=9000), head_pod) is False


def test_direct_ingress_gives_the_front_the_configured_port():
    env = direct_ingress_environment(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve hands out ports from [min, max): exactly the one asked for
    assert (
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"],
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"],
    ) == ("8123", "8124")


def test_a_port_in_use_is_refused_before_anything_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        own = load(host="127.0.0.1", port=port)
        with pytest.raises(ValueError, match=f"port: cannot listen on 127.0.0.1:{port}"):
            check_port_free(own, {})
        # joined through the proxy: the port is on the proxy's node, maybe not this one
        check_port_free(load(host="127.0.0.1", port=port, ray_address="auto"), {})
    check_port_free(own, {})  # closed: free again
