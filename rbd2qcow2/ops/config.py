"""The ``run`` configuration: a TOML file, checked completely before anything is touched.

Every problem is a :class:`~rbd2qcow2.core.errors.ConfigError` naming the file,
the key and the reason.  Example (``docs/operations.md`` has the full one)::

    target = "/backup"
    jobs = 2

    [[clusters]]
    conf = "/etc/ceph/ceph.conf"
    id = "backup"

    [[clusters.pools]]
    name = "rbd"
    exclude = ["*-scratch"]

    [retention]
    keep_daily = 7
    keep_weekly = 4
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.names import ImageSpec
from ..core.retention import Policy, parse_duration

SKIP_META = "rbd2qcow2.skip"


@dataclass(frozen=True)
class PoolConfig:
    name: str
    namespaces: tuple[str, ...] = ("*",)  # patterns; "" is the default namespace
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def wants_namespace(self, ns: str) -> bool:
        return any(fnmatchcase(ns, p) for p in self.namespaces)

    def wants(self, image: ImageSpec) -> bool:
        return (
            self.wants_namespace(image.namespace)
            and any(fnmatchcase(image.name, p) for p in self.include)
            and not any(fnmatchcase(image.name, p) for p in self.exclude)
        )


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    conf: str | None = None
    client_id: str | None = None
    keyring: str | None = None
    pools: tuple[PoolConfig, ...] = ()


@dataclass(frozen=True)
class VerifyConfig:
    structure: bool = True
    deep: bool = False
    source_sample: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    path: Path
    target: Path
    clusters: tuple[ClusterConfig, ...]
    jobs: int = 2
    parallel: int = 4
    check_unchanged: float = 0.002
    whole_object: bool = False
    claim_ttl: int = 300
    retention: Policy | None = None
    max_depth: int | None = None
    verify: VerifyConfig = field(default_factory=VerifyConfig)


class Table:
    """Typed access to one TOML table that reports unknown keys and wrong types."""

    def __init__(self, raw: Any, where: str, file: Path) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: {where}: expected a table")
        self.raw = raw
        self.where = where
        self.file = file
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.key(name)}: {reason}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.raw:
            if required:
                raise self.fail(name, "missing (required)")
            return default
        value = self.raw[name]
        if isinstance(value, bool) and kind in (int, float):  # TOML true is not a number
            raise self.fail(name, f"expected {kind.__name__}, got a boolean")
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(name, f"expected {names}, got {type(value).__name__} {value!r}")
        return value

    def number(self, name: str, default: int, lo: int, hi: int | None = None) -> int:
        value = int(self.get(name, int, default))
        if value < lo or (hi is not None and value > hi):
            raise self.fail(name, f"must be between {lo} and {hi}" if hi is not None else f"must be at least {lo}")
        return value

    def fraction(self, name: str, default: float) -> float:
        value = float(self.get(name, float, default))
        if not 0.0 <= value <= 1.0:
            raise self.fail(name, "must be between 0 and 1")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        if not all(isinstance(v, str) for v in value):
            raise self.fail(name, "expected a list of strings")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def load(path: Path) -> RunConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path) -> RunConfig:
    top = Table(raw, "", path)
    target = Path(top.get("target", str, required=True))
    if not target.is_absolute():
        raise top.fail("target", "must be an absolute path")
    clusters_raw = top.get("clusters", list, required=True)
    if not clusters_raw:
        raise top.fail("clusters", "at least one [[clusters]] entry is needed")
    clusters = tuple(_cluster(c, i, path) for i, c in enumerate(clusters_raw))
    _one_cluster_per_pool(clusters, path)
    policy, max_depth = _retention(top.get("retention", dict), path)
    cfg = RunConfig(
        path=path,
        target=target,
        clusters=clusters,
        jobs=top.number("jobs", 2, 1, 64),
        parallel=top.number("parallel", 4, 1, 64),
        check_unchanged=top.fraction("check_unchanged", 0.002),
        whole_object=bool(top.get("whole_object", bool, False)),
        claim_ttl=top.number("claim_ttl", 300, 10),
        retention=policy,
        max_depth=max_depth,
        verify=_verify(top.get("verify", dict), path),
    )
    top.done()
    return cfg


def _cluster(raw: Any, index: int, path: Path) -> ClusterConfig:
    t = Table(raw, f"clusters[{index}]", path)
    pools_raw = t.get("pools", list, required=True)
    if not pools_raw:
        raise t.fail("pools", "at least one [[clusters.pools]] entry is needed")
    cluster = ClusterConfig(
        name=t.get("name", str, f"cluster{index}"),
        conf=t.get("conf", str),
        client_id=t.get("id", str),
        keyring=t.get("keyring", str),
        pools=tuple(_pool(p, f"{t.where}.pools[{j}]", path) for j, p in enumerate(pools_raw)),
    )
    t.done()
    return cluster


def _one_cluster_per_pool(clusters: tuple[ClusterConfig, ...], path: Path) -> None:
    """Chain directories are named by pool, namespace and image, not by cluster: two clusters'
    pools of one name would share them (and each run would take the other's chains for its own)."""
    owner: dict[str, int] = {}
    for i, cluster in enumerate(clusters):
        for pool in cluster.pools:
            first = owner.setdefault(pool.name, i)
            if first != i:
                raise ConfigError(
                    f"{path}: clusters[{first}] ({clusters[first].name!r}) and clusters[{i}] ({cluster.name!r}) "
                    f"both back up pool {pool.name!r}, whose chains would share one directory of the target; "
                    "use a separate configuration and target for one of them"
                )


def _pool(raw: Any, where: str, path: Path) -> PoolConfig:
    t = Table(raw, where, path)
    pool = PoolConfig(
        name=t.get("name", str, required=True),
        namespaces=t.strings("namespaces", ("*",)),
        include=t.strings("include", ("*",)),
        exclude=t.strings("exclude", ()),
    )
    if not pool.name or "/" in pool.name:
        raise t.fail("name", "not a pool name")
    t.done()
    return pool


def _retention(raw: Any, path: Path) -> tuple[Policy | None, int | None]:
    if raw is None:
        return None, None
    t = Table(raw, "retention", path)
    within = t.get("keep_within", str)
    try:
        keep_within = parse_duration(within) if within is not None else None
    except ValueError as exc:
        raise t.fail("keep_within", str(exc)) from None
    policy = Policy(
        keep_within=keep_within,
        keep_last=t.number("keep_last", 0, 0),
        keep_hourly=t.number("keep_hourly", 0, 0),
        keep_daily=t.number("keep_daily", 0, 0),
        keep_weekly=t.number("keep_weekly", 0, 0),
        keep_monthly=t.number("keep_monthly", 0, 0),
        keep_yearly=t.number("keep_yearly", 0, 0),
    )
    max_depth = t.get("max_depth", int)
    if max_depth is not None and max_depth < 1:
        raise t.fail("max_depth", "must be at least 1")
    t.done()
    if policy.empty and max_depth is None:
        raise ConfigError(f"{path}: retention: give at least one keep_* rule or max_depth")
    return policy, max_depth


def _verify(raw: Any, path: Path) -> VerifyConfig:
    if raw is None:
        return VerifyConfig()
    t = Table(raw, "verify", path)
    cfg = VerifyConfig(
        structure=bool(t.get("structure", bool, True)),
        deep=bool(t.get("deep", bool, False)),
        source_sample=t.fraction("source_sample", 0.0),
    )
    t.done()
    return cfg


__all__ = ["SKIP_META", "ClusterConfig", "PoolConfig", "RunConfig", "VerifyConfig", "load", "parse"]
