"""Tenants: API keys map to namespaces; each namespace has its own index, documents and chunk KV.

Configured by a JSON file (``blendrag serve --api-keys FILE``) or the same JSON in the
``BLENDRAG_API_KEYS`` environment variable::

    {"keys": {"<api key>": "<namespace>", ...}, "shared_kv": ["<namespace>", ...]}

A request names its key as ``Authorization: Bearer <key>`` (what the ``openai`` client sends);
a missing or unknown key is a 401. Namespace ``ns`` keeps its index in ``INDEX_DIR/namespaces/ns``
and its KV under keys prefixed with ``ns`` (see ``NamespacedStore``), unless it is listed in
``shared_kv``: then its KV is shared by content with every other shared namespace. Without a
configuration the server has one namespace, ``default``, answering from ``INDEX_DIR`` with no key.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from blendrag.errors import BlendRAGError
from blendrag.store import NamespacedStore

from .rag import RAGService

ENV_VAR = "BLENDRAG_API_KEYS"
DEFAULT_NAMESPACE = "default"
NAMESPACES_DIR = "namespaces"
# Lower-case letters, digits, underscores: safe as a directory name and as a store key prefix.
_NAMESPACE_RE = re.compile(r"[a-z0-9_]{1,32}")
_BEARER = HTTPBearer(auto_error=False, description="An API key from the server's key file")


@dataclass(frozen=True)
class TenantConfig:
    keys: dict[str, str]  # API key -> namespace
    shared_kv: frozenset[str] = frozenset()

    @property
    def namespaces(self) -> list[str]:
        return sorted(set(self.keys.values()))

    def namespace_of(self, key: str | None) -> str | None:
        """The key's namespace, or None; compares in constant time against every key."""
        found = None
        for known, namespace in self.keys.items():
            if key is not None and hmac.compare_digest(known.encode(), key.encode()):
                found = namespace
        return found

    @classmethod
    def parse(cls, text: str, source: str) -> TenantConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise BlendRAGError(f"{source}: not valid JSON: {err}") from None
        keys = raw.get("keys") if isinstance(raw, dict) else None
        if not isinstance(keys, dict) or not keys or set(raw) - {"keys", "shared_kv"}:
            shape = '{"keys": {"<api key>": "<namespace>", ...}, "shared_kv": [...]}'
            raise BlendRAGError(f"{source}: expected {shape}")
        for key, namespace in keys.items():
            if len(key) < 8 or not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
                raise BlendRAGError(
                    f"{source}: API keys need 8+ characters and namespaces 1-32 of [a-z0-9_] "
                    f"(got namespace {namespace!r})"
                )
        shared = raw.get("shared_kv", [])
        if not isinstance(shared, list) or not set(shared) <= set(keys.values()):
            raise BlendRAGError(f"{source}: shared_kv must list namespaces that have keys")
        return cls(dict(keys), frozenset(shared))


def load_tenants(path: Path | None = None) -> TenantConfig | None:
    """The configuration from ``path``, else from ``$BLENDRAG_API_KEYS``, else None (no keys)."""
    if path is not None:
        try:
            return TenantConfig.parse(path.read_text(encoding="utf-8"), str(path))
        except OSError as err:
            raise BlendRAGError(f"{path}: cannot read API keys: {err}") from None
    if os.environ.get(ENV_VAR):
        return TenantConfig.parse(os.environ[ENV_VAR], f"${ENV_VAR}")
    return None


def namespace_engine(engine, tenants: TenantConfig, namespace: str):
    """The engine as ``namespace`` sees it: same model and weights, its own view of the KV store."""
    if namespace in tenants.shared_kv:
        return engine
    return engine.with_store(NamespacedStore(engine.store, namespace))


def namespace_index_dir(root: Path, namespace: str) -> Path:
    return Path(root) / NAMESPACES_DIR / namespace


def service_resolver(
    services: dict[str, RAGService], tenants: TenantConfig | None
) -> Callable[..., RAGService]:
    """The FastAPI dependency that gives a request its namespace's service (or a 401)."""
    if tenants is None:
        only = services[DEFAULT_NAMESPACE]

        def single() -> RAGService:
            return only

        return single

    def by_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]) -> RAGService:
        namespace = tenants.namespace_of(credentials.credentials if credentials else None)
        if namespace is None:
            raise HTTPException(401, "missing or unknown API key", headers={"WWW-Authenticate": "Bearer"})
        return services[namespace]

    return by_key
