"""Typed errors of KV transfer. Servicers map them to status codes once; callers branch on type.

Every error is a KvTransferError, so `except KvTransferError` is "the KV did not arrive; recompute
the prompt locally or retry elsewhere".
"""


class KvTransferError(Exception):
    """The KV could not be moved (transport failure, holder unreachable, ...)."""


class KvIncompatibleError(KvTransferError):
    """The two sides' layouts (or wire versions) differ: no bytes were moved, retrying cannot help."""


class KvLeaseNotFound(KvTransferError):
    """The holder does not know the lease: released, expired, or never granted."""

    def __init__(self, lease_id: str, detail: str = "") -> None:
        self.lease_id = lease_id
        super().__init__(f"lease {lease_id!r} not found" + (f": {detail}" if detail else ""))


class KvChecksumError(KvTransferError):
    """Bytes landed but do not match the holder's checksums: the destination blocks hold garbage.

    `bad_positions` are indexes into the handle's block list (and so into dst_block_ids);
    `bad_dst_block_ids` are the corresponding local blocks.
    """

    def __init__(self, bad_positions: list[int], bad_dst_block_ids: list[int]) -> None:
        self.bad_positions = list(bad_positions)
        self.bad_dst_block_ids = list(bad_dst_block_ids)
        super().__init__(f"checksum mismatch in {len(bad_positions)} block(s) at positions "
                         f"{self.bad_positions[:8]}{'...' if len(bad_positions) > 8 else ''} "
                         f"(local blocks {self.bad_dst_block_ids[:8]})")
