"""The controller's state store: expert map, worker registry, operation journal.

Two implementations behind one interface (:class:`StateStore`), picked by
:func:`make_state_store` from a URL:

- :class:`MemoryStateStore` (``memory://``, the default): in-process and
  thread-safe. It lives and dies with the controller's process, so it suits
  one-process deployments, tests and the simulator.
- :class:`RedisStateStore` (``redis://host:port/db``): for production. A
  restarted controller opens a new store on the same URL and finds the map,
  the workers and the journal of half-done operations where it left them.

Every value is a JSON-serialisable dict and both stores keep it as canonical
JSON text, so the memory store behaves exactly like Redis: callers get fresh
copies, tuples come back as lists, and non-JSON values fail on write.

Writes that must never race are atomic on the server: publishing the map is a
compare-and-set on its epoch (two controllers can never both publish epoch
N+1), and journal appends take their sequence number in the same step as the
write. Both are idempotent under the Redis client's retry-on-reconnect, which
may send a command twice when a connection drops after the command went out.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, get_args
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis

__all__ = [
    "JournalResult",
    "MemoryStateStore",
    "RedisStateStore",
    "StateStore",
    "StateStoreUnavailable",
    "make_state_store",
]

logger = logging.getLogger(__name__)

JournalResult = Literal["done", "rolled_back", "failed"]
JOURNAL_RESULTS: Final[tuple[str, ...]] = get_args(JournalResult)

# What make_state_store accepts; also the text of its error message.
_ACCEPTED_URLS: Final = (
    "memory:// (embedded, the default), redis://host:port/db, rediss://host:port/db (TLS), "
    "unix:///path/to/redis.sock"
)


class StateStoreUnavailable(RuntimeError):
    """The state store cannot be reached (Redis down, network cut, timeout).

    Recoverable: the store object reconnects by itself once the server is
    back, so callers retry the same call later rather than rebuild anything.
    """


class StateStore(ABC):
    """Durable state of one deployment's control plane.

    The controller is the only writer of the expert map. Engines learn a new
    map from the controller itself (pushed, with a pull of the controller's
    map as the fallback), never from the store: one channel per fact. Remote implementations raise
    :class:`StateStoreUnavailable` from every method but :meth:`ping` when the
    backend cannot be reached. Misuse (bad ids, non-JSON values, an epoch that
    does not increase, appending to a finished operation) raises ``ValueError``.
    """

    is_memory = False  # whether the state dies with the controller process

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the state lives, safe to log (no password)."""

    # -- expert map -------------------------------------------------------

    @abstractmethod
    def get_map(self) -> dict[str, Any] | None:
        """The stored expert map (``ExpertMap.to_dict()`` form), or None before the first."""

    @abstractmethod
    def put_map(self, map_dict: dict[str, Any], expected_epoch: int | None) -> bool:
        """Store ``map_dict`` if the stored epoch is ``expected_epoch`` (compare-and-set).

        ``expected_epoch=None`` means "nothing stored yet". Returns False when
        another writer got there first (the caller reloads and re-plans).
        Writing the map that is already stored returns True, so a retried
        call whose first attempt succeeded does not read as a lost race.
        Raises ``ValueError`` if ``map_dict["epoch"]`` is not an int greater
        than ``expected_epoch``: engines rely on one epoch meaning one map.
        """

    # -- controller state -------------------------------------------------

    @abstractmethod
    def put_value(self, key: str, value: dict[str, Any]) -> None:
        """Store a small JSON document under ``key`` (e.g. the autoscaler's policy state)."""

    @abstractmethod
    def get_value(self, key: str) -> dict[str, Any] | None:
        """The document stored under ``key``, or None."""

    # -- worker registry --------------------------------------------------

    @abstractmethod
    def put_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        """Register ``worker_id`` or replace its info."""

    @abstractmethod
    def get_workers(self) -> dict[str, dict[str, Any]]:
        """worker id -> info of every registered worker."""

    @abstractmethod
    def delete_worker(self, worker_id: str) -> bool:
        """Forget ``worker_id``; returns whether it was registered (unknown ids are fine)."""

    # -- operation journal ------------------------------------------------

    @abstractmethod
    def journal_append(self, op_id: str, step: str, data: dict[str, Any]) -> int:
        """Record that operation ``op_id`` is about to take ``step``; returns its sequence number.

        Sequence numbers increase across all operations of the store, so
        entries of different operations have a total order. Raises
        ``ValueError`` if ``op_id`` was already finished.
        """

    @abstractmethod
    def journal_entries(self, op_id: str) -> list[dict[str, Any]]:
        """Entries of ``op_id`` in append order (empty if unknown).

        Each entry is ``{"seq": int, "ts": float (unix time), "op_id": str,
        "step": str, "data": dict}``.
        """

    @abstractmethod
    def open_operations(self) -> list[str]:
        """Operations with entries that are not finished, oldest first.

        A restarted controller finishes or rolls back each of these.
        """

    @abstractmethod
    def journal_finish(self, op_id: str, result: JournalResult) -> None:
        """Mark ``op_id`` finished with ``result`` ("done", "rolled_back" or "failed").

        Finishing again with the same result is a no-op (safe to retry);
        with another result, or for an op with no entries, ``ValueError``.
        """

    @abstractmethod
    def journal_result(self, op_id: str) -> JournalResult | None:
        """How ``op_id`` finished, or None if it is open or unknown."""

    # -- health and lifecycle --------------------------------------------

    @abstractmethod
    def clear(self) -> None:
        """Forget this deployment's whole state: map, workers, values, journal.

        A clean stop calls it: its workers are stopped, so a stored map that
        points at them would be a lie to the next start. Other deployments
        sharing the Redis are untouched.
        """

    @abstractmethod
    def ping(self) -> bool:
        """Whether the backend answers. Never raises :class:`StateStoreUnavailable`."""

    def close(self) -> None:  # noqa: B027 (optional hook: the memory store holds nothing)
        """Release connections. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def make_state_store(url: str | None, deployment: str = "default") -> StateStore:
    """The state store for ``url``: None or ``memory://`` embedded, ``redis://...`` Redis.

    ``deployment`` namespaces the keys (``elasticmoe:<deployment>:...``) so
    several deployments can share one Redis.
    """
    _check_name(deployment, "deployment")
    if url is None:
        return MemoryStateStore()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        if url.lower() not in ("memory://", "memory:"):
            raise ValueError(f"state store URL {url!r}: memory:// takes no host or path")
        return MemoryStateStore()
    if scheme in ("redis", "rediss", "unix"):
        return RedisStateStore(url, prefix=f"elasticmoe:{deployment}")
    raise ValueError(f"unsupported state store URL {_redact(url)!r}; accepted: {_ACCEPTED_URLS}")


# ---------------------------------------------------------------------------
# Validation and encoding shared by both stores


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _dump(value: object, what: str) -> str:
    """Canonical JSON text (sorted keys, compact): equal values give equal text."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from e


def _map_epoch(map_dict: object, expected_epoch: int | None) -> int:
    """The new map's epoch, checked against the epoch it replaces."""
    epoch = map_dict.get("epoch") if isinstance(map_dict, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"expert map needs a non-negative int 'epoch', got {epoch!r}")
    if expected_epoch is not None and epoch <= expected_epoch:
        raise ValueError(
            f"expert map epoch {epoch} must be greater than the expected epoch "
            f"{expected_epoch}: every change publishes a new epoch"
        )
    return epoch


def _check_epoch(epoch: object) -> int:
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    return epoch


def _check_result(result: object) -> JournalResult:
    if result not in JOURNAL_RESULTS:
        raise ValueError(f"journal result must be one of {JOURNAL_RESULTS}, got {result!r}")
    return result  # type: ignore[return-value]


def _redact(url: str) -> str:
    """``url`` with any password replaced, for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return urlunsplit(parts._replace(netloc=user + netloc))
    except ValueError:
        return "<unparseable URL>"


# ---------------------------------------------------------------------------
# Embedded store


class MemoryStateStore(StateStore):
    """In-process store (the default): one lock, JSON text values."""

    is_memory = True

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._map_json: str | None = None
        self._map_epoch: int | None = None
        self._workers: dict[str, str] = {}
        self._values: dict[str, str] = {}
        self._seq = 0
        self._journal: dict[str, list[str]] = {}
        self._open: dict[str, int] = {}  # op id -> seq of its first entry
        self._finished: dict[str, JournalResult] = {}

    @property
    def url(self) -> str:
        return "memory://"

    def get_map(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._map_json is None else json.loads(self._map_json)

    def put_map(self, map_dict: dict[str, Any], expected_epoch: int | None) -> bool:
        epoch = _map_epoch(map_dict, expected_epoch)
        text = _dump(map_dict, "expert map")
        with self._lock:
            if self._map_epoch == epoch and self._map_json == text:
                return True
            if self._map_epoch != expected_epoch:
                return False
            self._map_json, self._map_epoch = text, epoch
            return True

    def put_value(self, key: str, value: dict[str, Any]) -> None:
        text = _dump(value, f"value of {key!r}")
        with self._lock:
            self._values[_check_name(key, "key")] = text

    def get_value(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            text = self._values.get(_check_name(key, "key"))
        return None if text is None else json.loads(text)

    def put_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        text = _dump(info, f"info of worker {worker_id!r}")
        with self._lock:
            self._workers[_check_name(worker_id, "worker_id")] = text

    def get_workers(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {w: json.loads(t) for w, t in self._workers.items()}

    def delete_worker(self, worker_id: str) -> bool:
        with self._lock:
            return self._workers.pop(_check_name(worker_id, "worker_id"), None) is not None

    def journal_append(self, op_id: str, step: str, data: dict[str, Any]) -> int:
        _check_name(op_id, "op_id")
        _check_name(step, "step")
        data_json = _dump(data, f"data of step {step!r}")
        with self._lock:
            if op_id in self._finished:
                raise ValueError(
                    f"operation {op_id!r} is already finished ({self._finished[op_id]}); "
                    "start a new operation id"
                )
            self._seq += 1
            entry = {"seq": self._seq, "ts": time.time(), "op_id": op_id, "step": step}
            # Splice the canonical data text in rather than re-encoding it.
            text = json.dumps(entry, separators=(",", ":"))[:-1] + f',"data":{data_json}}}'
            self._journal.setdefault(op_id, []).append(text)
            self._open.setdefault(op_id, self._seq)
            return self._seq

    def journal_entries(self, op_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(t) for t in self._journal.get(op_id, [])]

    def open_operations(self) -> list[str]:
        with self._lock:
            return sorted(self._open, key=self._open.__getitem__)

    def journal_finish(self, op_id: str, result: JournalResult) -> None:
        _check_result(result)
        with self._lock:
            prev = self._finished.get(op_id)
            if prev is not None:
                if prev != result:
                    raise ValueError(
                        f"operation {op_id!r} already finished as {prev!r}, not {result!r}"
                    )
                return
            if op_id not in self._journal:
                raise ValueError(f"unknown operation {op_id!r}: it has no journal entries")
            self._finished[op_id] = result
            del self._open[op_id]

    def journal_result(self, op_id: str) -> JournalResult | None:
        with self._lock:
            return self._finished.get(op_id)

    def clear(self) -> None:
        with self._lock:
            self._map_json = self._map_epoch = None
            self._workers.clear()
            self._values.clear()
            self._journal.clear()
            self._open.clear()
            self._finished.clear()
            # _seq keeps counting: sequence numbers never repeat within a store

    def ping(self) -> bool:
        return True


# ---------------------------------------------------------------------------
# Redis store

# KEYS: map hash. ARGV: expected epoch ("" = nothing stored), new epoch, map JSON.
# Writing the map that is already stored succeeds, so a retried call whose first
# attempt went through is not reported as a lost race.
_PUT_MAP_LUA: Final = """
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur == ARGV[2] and redis.call('HGET', KEYS[1], 'map') == ARGV[3] then return 1 end
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'map', ARGV[3])
return 1
"""

# KEYS: seq counter, open-ops zset, finished hash, op's entry list.
# ARGV: op id, idempotency token, entry JSON without "seq" (starts with '{').
# Returns the entry's seq, or -1 if the op is finished. The token makes a retried
# append (connection lost after the command was sent) return the first seq
# instead of writing the step twice.
_APPEND_LUA: Final = """
local last = redis.call('LINDEX', KEYS[4], -1)
if last then
  local prev = cjson.decode(last)
  if prev['token'] == ARGV[2] then return prev['seq'] end
end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return -1 end
local seq = redis.call('INCR', KEYS[1])
redis.call('RPUSH', KEYS[4], '{"seq":' .. seq .. ',' .. string.sub(ARGV[3], 2))
redis.call('ZADD', KEYS[2], 'NX', seq, ARGV[1])
return seq
"""

# KEYS: open-ops zset, finished hash, op's entry list. ARGV: op id, result.
# Returns {1} finished (or already finished with this result), {0} unknown op,
# {-1, previous result} already finished with another result.
_FINISH_LUA: Final = """
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then
  if prev == ARGV[2] then return {1} end
  return {-1, prev}
end
if redis.call('EXISTS', KEYS[3]) == 0 then return {0} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return {1}
"""


def _no_setinfo_kwargs() -> dict[str, Any]:
    """Client options that skip ``CLIENT SETINFO`` when a connection opens.

    Each handshake round trip has its own timeout and retry, which multiplies
    how long a call hangs on a server that accepts connections but never
    answers (a frozen process, a half-open network path). The option is
    ``driver_info`` in newer clients and ``lib_name``/``lib_version`` before.
    """
    import redis.connection

    params = inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    if "driver_info" in params:
        return {"driver_info": None}
    return {"lib_name": None, "lib_version": None}


class RedisStateStore(StateStore):
    """State in Redis under ``prefix`` (``elasticmoe:<deployment>``).

    Keys: ``<prefix>:map`` (hash: epoch, map), ``<prefix>:workers`` (hash),
    ``<prefix>:journal:seq``, ``<prefix>:journal:open`` (sorted set, score =
    first seq), ``<prefix>:journal:finished`` (hash), ``<prefix>:journal:op:<id>``
    (list).

    Sockets time out after ``socket_timeout_s`` and each command is retried
    once on a fresh connection, so a call fails fast with
    :class:`StateStoreUnavailable` while Redis is down, and the same object
    works again once Redis is back (pooled connections are replaced lazily).
    Nothing connects until the first call.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "elasticmoe:default",
        *,
        socket_timeout_s: float = 1.0,
    ) -> None:
        try:
            import redis
            import redis.backoff
            import redis.exceptions
            import redis.retry
        except ImportError as e:  # the memory store must work without the client
            raise ImportError(
                "the Redis state store needs the redis client: pip install 'redis>=5'"
            ) from e
        self._redis = redis
        self._url = _redact(url)
        self._prefix = _check_name(prefix, "prefix")
        self._socket_timeout_s = socket_timeout_s
        self._unavailable_errors: tuple[type[Exception], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
        )
        # One quick retry replaces a connection that went stale while Redis
        # restarted; more would only delay StateStoreUnavailable during an outage.
        retry = redis.retry.Retry(
            redis.backoff.ExponentialBackoff(cap=0.2, base=0.05),
            retries=1,
            supported_errors=self._unavailable_errors,
        )
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                retry=retry,
                retry_on_error=list(self._unavailable_errors),
                **_no_setinfo_kwargs(),
            )
        except ValueError as e:
            raise ValueError(f"invalid Redis URL {self._url!r}: {e}") from e
        self._k_map = f"{prefix}:map"
        self._k_workers = f"{prefix}:workers"
        self._k_values = f"{prefix}:values"
        self._k_seq = f"{prefix}:journal:seq"
        self._k_open = f"{prefix}:journal:open"
        self._k_finished = f"{prefix}:journal:finished"
        # Scripts run by EVALSHA and reload themselves after a server restart.
        self._put_map_script = self._client.register_script(_PUT_MAP_LUA)
        self._append_script = self._client.register_script(_APPEND_LUA)
        self._finish_script = self._client.register_script(_FINISH_LUA)

    @property
    def url(self) -> str:
        return self._url

    @property
    def prefix(self) -> str:
        """Key prefix of this deployment's state."""
        return self._prefix

    def _op_key(self, op_id: str) -> str:
        return f"{self._prefix}:journal:op:{op_id}"

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn the client's connection errors into :class:`StateStoreUnavailable`."""
        try:
            yield
        except self._unavailable_errors as e:
            raise StateStoreUnavailable(
                f"Redis state store at {self._url} is unavailable ({what}: {e}); check "
                "that redis-server is running and reachable. This store reconnects by "
                "itself once Redis is back: retry the call."
            ) from e

    # -- expert map -------------------------------------------------------

    def get_map(self) -> dict[str, Any] | None:
        with self._guard("get_map"):
            text = self._client.hget(self._k_map, "map")
        return None if text is None else json.loads(text)

    def put_map(self, map_dict: dict[str, Any], expected_epoch: int | None) -> bool:
        epoch = _map_epoch(map_dict, expected_epoch)
        text = _dump(map_dict, "expert map")
        expected = "" if expected_epoch is None else str(expected_epoch)
        with self._guard("put_map"):
            won = self._put_map_script(keys=[self._k_map], args=[expected, str(epoch), text])
        return bool(won)

    # -- worker registry --------------------------------------------------

    def put_value(self, key: str, value: dict[str, Any]) -> None:
        text = _dump(value, f"value of {_check_name(key, 'key')!r}")
        with self._guard("put_value"):
            self._client.hset(self._k_values, key, text)

    def get_value(self, key: str) -> dict[str, Any] | None:
        _check_name(key, "key")
        with self._guard("get_value"):
            text = self._client.hget(self._k_values, key)
        return None if text is None else json.loads(text)

    def put_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        _check_name(worker_id, "worker_id")
        text = _dump(info, f"info of worker {worker_id!r}")
        with self._guard("put_worker"):
            self._client.hset(self._k_workers, worker_id, text)

    def get_workers(self) -> dict[str, dict[str, Any]]:
        with self._guard("get_workers"):
            raw = self._client.hgetall(self._k_workers)
        return {w: json.loads(t) for w, t in raw.items()}

    def delete_worker(self, worker_id: str) -> bool:
        _check_name(worker_id, "worker_id")
        with self._guard("delete_worker"):
            return bool(self._client.hdel(self._k_workers, worker_id))

    # -- operation journal ------------------------------------------------

    def journal_append(self, op_id: str, step: str, data: dict[str, Any]) -> int:
        _check_name(op_id, "op_id")
        _check_name(step, "step")
        return self._append(op_id, step, data, token=uuid.uuid4().hex)

    def _append(self, op_id: str, step: str, data: dict[str, Any], token: str) -> int:
        """One append attempt; the same ``token`` never writes twice."""
        data_json = _dump(data, f"data of step {step!r}")
        head = {"ts": time.time(), "op_id": op_id, "step": step, "token": token}
        body = json.dumps(head, separators=(",", ":"))[:-1] + f',"data":{data_json}}}'
        with self._guard("journal_append"):
            seq = self._append_script(
                keys=[self._k_seq, self._k_open, self._k_finished, self._op_key(op_id)],
                args=[op_id, token, body],
            )
        if seq == -1:
            raise ValueError(
                f"operation {op_id!r} is already finished ({self.journal_result(op_id)}); "
                "start a new operation id"
            )
        return int(seq)

    def journal_entries(self, op_id: str) -> list[dict[str, Any]]:
        with self._guard("journal_entries"):
            raw = self._client.lrange(self._op_key(op_id), 0, -1)
        entries = [json.loads(t) for t in raw]
        for entry in entries:
            del entry["token"]  # an implementation detail of retry safety
        return entries

    def open_operations(self) -> list[str]:
        with self._guard("open_operations"):
            return list(self._client.zrange(self._k_open, 0, -1))

    def journal_finish(self, op_id: str, result: JournalResult) -> None:
        _check_result(result)
        with self._guard("journal_finish"):
            reply = self._finish_script(
                keys=[self._k_open, self._k_finished, self._op_key(op_id)], args=[op_id, result]
            )
        if reply[0] == 0:
            raise ValueError(f"unknown operation {op_id!r}: it has no journal entries")
        if reply[0] == -1:
            raise ValueError(
                f"operation {op_id!r} already finished as {reply[1]!r}, not {result!r}"
            )

    def journal_result(self, op_id: str) -> JournalResult | None:
        with self._guard("journal_result"):
            return self._client.hget(self._k_finished, op_id)  # type: ignore[return-value]

    # -- health and lifecycle --------------------------------------------

    def clear(self) -> None:
        # Keys are "<prefix>:<name>"; the ":" keeps deployment "a" off "ab"'s keys.
        # The sequence counter goes too: the journal it numbered is gone.
        pattern = self._prefix.replace("[", "\\[").replace("*", "\\*").replace("?", "\\?")
        with self._guard("clear"):
            keys = list(self._client.scan_iter(match=f"{pattern}:*", count=500))
            for i in range(0, len(keys), 500):
                self._client.delete(*keys[i : i + 500])

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except self._unavailable_errors:
            return False

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisStateStore({self._url!r}, prefix={self._prefix!r})"
