"""The node's decision: may an index artifact be used to build lazy snapshots?

`signed` (the default): only when one of its signatures (simplesign.check) is by a trusted key
and over exactly this artifact's digest. `permissive`: every artifact, signed or not (the
behaviour before signatures existed; whoever can push a referrer is then trusted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from snapshotter.trust.keys import PublicKey
from snapshotter.trust.simplesign import Checked, Refusal, check


class TrustMode(StrEnum):
    SIGNED = "signed"
    PERMISSIVE = "permissive"


class FoundSignature(Protocol):
    """A signature as the registry lookup found it (remote/signatures.SignatureBlob)."""

    @property
    def where(self) -> str: ...  # e.g. "referrer sha256:…" or "tag sha256-….sig"

    @property
    def payload(self) -> bytes | None: ...  # None: could not be fetched (problem says why)

    @property
    def signature(self) -> str: ...

    @property
    def problem(self) -> str: ...


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    reason: str  # why, for the log: which key vouched, or why none did
    refusal: Refusal | None = None  # the most telling refusal when not trusted


@dataclass(frozen=True)
class TrustPolicy:
    mode: TrustMode = TrustMode.SIGNED
    keys: tuple[PublicKey, ...] = ()

    @classmethod
    def permissive(cls) -> TrustPolicy:
        return cls(TrustMode.PERMISSIVE)

    @property
    def checks_signatures(self) -> bool:
        """Whether artifacts must be signed to be used (decide() depends on signatures)."""
        return self.mode is TrustMode.SIGNED

    @property
    def needs_signatures(self) -> bool:
        """Whether looking signatures up can change a decision (without keys, none can)."""
        return self.mode is TrustMode.SIGNED and bool(self.keys)

    def describe(self) -> str:
        if self.mode is TrustMode.PERMISSIVE:
            return "permissive: unsigned indexes are used"
        if not self.keys:
            return "signed, but no public key configured: every index is refused"
        names = ", ".join(f"{k.key_id} ({k.path})" if k.path else k.key_id for k in self.keys)
        return f"signed by one of {len(self.keys)} key(s): {names}"

    def decide(self, artifact_digest: str, found: Sequence[FoundSignature]) -> Verdict:
        if self.mode is TrustMode.PERMISSIVE:
            return Verdict(True, "trust mode permissive")
        if not self.keys:
            return Verdict(
                False,
                "no public key configured to verify signatures with ([trust] public_keys)",
                Refusal.UNTRUSTED_KEY,
            )
        results: list[tuple[str, Checked]] = []
        for signature in found:
            if signature.payload is None:
                checked = Checked(refusal=Refusal.UNREADABLE_PAYLOAD, detail=signature.problem)
            else:
                checked = check(artifact_digest, signature.payload, signature.signature, self.keys)
            if checked.ok:
                return Verdict(True, f"signed by key {checked.key_id} ({signature.where})")
            results.append((signature.where, checked))
        if not results:
            return Verdict(False, Refusal.NO_SIGNATURE.value, Refusal.NO_SIGNATURE)
        order = list(Refusal)
        worst = max((checked.refusal for _, checked in results if checked.refusal), key=order.index)
        details = "; ".join(
            f"{where}: {checked.refusal} ({checked.detail})"
            if checked.detail
            else f"{where}: {checked.refusal}"
            for where, checked in results
        )
        return Verdict(False, f"{worst} [{details}]", worst)
