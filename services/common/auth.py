"""What the store and the router share about who makes a call: the metadata headers, reading a
bearer key, and the principal checked against the tenant of every adapter a call touches."""

from __future__ import annotations

from dataclasses import dataclass

from mintmesh.errors import TenantDenied, Unauthenticated
from mintmesh.identity import AdapterRef, parse_ref

AUTHORIZATION = "authorization"
TENANT_HEADER = "x-mint-tenant"
INTERNAL_TOKEN_HEADER = "x-mint-internal-token"


def bearer_key(value: object, missing: str) -> str:
    """The key of an ``authorization: Bearer <key>`` value. Unauthenticated(missing) when there
    is none; Unauthenticated naming the expected form when it is malformed."""
    if not isinstance(value, str) or not value:
        raise Unauthenticated(missing)
    scheme, _, key = value.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthenticated("authorization metadata must be 'Bearer <key>'")
    return key


@dataclass(frozen=True)
class Principal:
    """Who makes a call: one tenant, or an admin (every tenant)."""

    tenant: str = ""
    is_admin: bool = False
    key_id: str = ""

    def may_access(self, tenant: str) -> bool:
        return self.is_admin or (bool(self.tenant) and self.tenant == tenant)

    def check(self, tenant: str, what: str) -> None:
        """Raise TenantDenied unless this principal may touch tenant's adapters."""
        if not self.may_access(tenant):
            raise TenantDenied(
                f"tenant {self.tenant!r} may not access {what} of tenant {tenant!r}",
                metadata={"tenant": self.tenant, "target_tenant": tenant},
            )

    def check_adapter(self, ref: AdapterRef) -> None:
        """Raise TenantDenied unless this principal may touch the adapter ref names."""
        self.check(ref.tenant, f"adapter {ref.full_name!r}")

    def check_ref(self, ref: str) -> AdapterRef:
        """parse_ref(ref) (InvalidArgument when malformed), checked as check_adapter."""
        parsed = parse_ref(ref)
        self.check_adapter(parsed)
        return parsed

    def require_admin(self, what: str) -> None:
        if not self.is_admin:
            raise TenantDenied(
                f"{what} needs an admin key; tenant {self.tenant!r} is not an admin",
                metadata={"tenant": self.tenant},
            )


ADMIN = Principal(tenant="", is_admin=True, key_id="")
